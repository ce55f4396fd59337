"""Meta-KV attention for Hugging Face causal language models.

``add_meta_kv(model, config)`` attaches a :class:`MetaKV` module to a loaded transformers model
(as ``model.meta_kv``) and hooks every self-attention layer:

1. a pre-hook on the decoder (``model.base_model``) records the 2-D padding mask of the call;
2. a pre-hook on each attention module computes the meta-state C of the chunk from the
   attention input x (continuing the running state the KV cache carries when decoding)
   and the modulation ``delta = alpha * (x A(C)) B(C)`` for K and V;
3. hooks on the K/V projections add delta to their outputs.

So the model's own forward, its KV cache (which stores the modulated K and V) and
``generate()`` work unchanged, the base weights are untouched, and the state-dict keys of the
base model keep their names (Meta-KV parameters live under ``meta_kv.``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.masking_utils import find_packed_sequence_indices

from metakv_cl.modeling.cache_state import running_states
from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.modeling.families import attention_sites
from metakv_cl.modeling.modulation import build_modulation, delta_weights
from metakv_cl.modeling.sources import AddressedMemory, ConsolidatedMemory, PackedDocuments, build_dynamic_source
from metakv_cl.transformers_api import cache_argument_name, passed_cache

PARAMETER_GROUPS = ("all", "memory", "generator", "source")


class MetaKVLayer(nn.Module):
    """The Meta-KV parts of one attention layer: its dynamic source and its modulation."""

    def __init__(self, config: MetaKVConfig, hidden_size: int, kv_size: int):
        super().__init__()
        dynamic = config.dynamic_source
        self.source = (
            build_dynamic_source(dynamic, hidden_size, config.state_dim, config.attentive_score_bound)
            if dynamic is not None
            else None
        )
        self.bank = AddressedMemory(config.memory_slots, config.state_dim) if config.uses_bank else None
        self.modulation = build_modulation(config, hidden_size, kv_size)

    def forward(
        self,
        x: torch.Tensor,
        real: torch.Tensor | None,
        state,
        memory_state: torch.Tensor | None,
        documents: PackedDocuments | None = None,
    ):
        """The K/V modulation of the chunk x and the new running state.

        A function of tensors only (no cache or hook bookkeeping), so that it can be compiled.

        Args:
            x: attention input [batch, time, hidden].
            real: [batch, time] bool, False on padding, or None.
            state: the dynamic source's running state from earlier chunks, or None.
            memory_state: the consolidated C [state_dim], or None.
            documents: the documents of packed rows (no running state then): the dynamic
                source summarises each one alone.

        Returns:
            delta [batch, time, 2 * kv_size] (zero on padding) and the new state (or None).
        """
        c, new_state = None, None
        if self.source is not None and documents is not None:
            real_split = documents.split(real if real is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
            c = documents.merge(self.source(documents.split(x), real_split, None)[0])
        elif self.source is not None:
            c, new_state = self.source(x, real, state)
        if self.bank is not None:
            c = self.bank(c)  # the summary addresses the bank
        if memory_state is not None:
            m = memory_state.to(x.dtype).view(1, 1, -1)  # broadcast: one state for every token
            c = m if c is None else c + m
        delta = self.modulation(x, c)
        if real is not None:
            delta = delta * real.unsqueeze(-1).to(delta.dtype)  # padding keeps its base K/V
        return delta, new_state


class MetaKV(nn.Module):
    """All Meta-KV parameters of a model plus the bookkeeping of its hooks.

    Attributes:
        config: the :class:`MetaKVConfig`.
        layers: one :class:`MetaKVLayer` per self-attention layer.
        memories: the consolidated state M (one per layer, or one shared), empty if unused.
        merged: whether the consolidated modulation is currently folded into the base weights.
        enabled: whether the modulation is applied; off, the model computes its base model
            (``MetaKVModel.disable_meta_kv``).
    """

    def __init__(self, config: MetaKVConfig, adapter, sites):
        super().__init__()
        self.config = config
        self.adapter = adapter
        self.sites = sites
        self.layers = nn.ModuleList(MetaKVLayer(config, s.hidden_size, s.kv_size) for s in sites)
        memory_count = (1 if config.share_memory else len(sites)) if config.uses_memory else 0
        self.memories = nn.ModuleList(ConsolidatedMemory(config.memory_slots, config.state_dim) for _ in range(memory_count))
        self.merged = False
        self.enabled = True
        self._padding_mask: torch.Tensor | None = None
        self._documents: PackedDocuments | None = None
        self.slots = [_LayerSlot(self, index) for index in range(len(sites))]
        self._fused_steps: list | None = None
        self._hooks: list = []

    def __getstate__(self):
        # packed kernel weights belong to this process's device: a pickled copy (ddp_spawn)
        # packs its own
        state = self.__dict__.copy()
        state["_fused_steps"] = None
        return state

    def memory_for(self, layer: int) -> ConsolidatedMemory | None:
        if not self.config.uses_memory:
            return None
        return self.memories[0 if self.config.share_memory else layer]

    def running_state(self, cache, layer: int):
        """The dynamic state ``cache`` carries for ``layer`` (None for a new sequence)."""
        return None if cache is None else running_states(cache).get(layer)

    def reset_running_state(self, cache) -> None:
        """Start a new sequence on ``cache``: its next chunk sees no earlier state."""
        running_states(cache).reset()

    def enable_fused_decoding(self) -> list:
        """Decode single tokens of static caches through the fused kernel where a layer supports it.

        The kernel packs each layer's weights once, here: call again after the weights change.

        Returns:
            The per-layer fused steps (None where a layer stays on the torch path). A CUDA graph
            that recorded them reads their packed weights: keep the list alive with the graph.
        """
        from metakv_cl.modeling.fused_decode import FusedDecodeStep

        self._fused_steps = [FusedDecodeStep(layer) if FusedDecodeStep.supports(layer) else None for layer in self.layers]
        return self._fused_steps

    def layer_forward(self, slot: "_LayerSlot", x: torch.Tensor, cache) -> None:
        """Compute and stash (in ``slot.pending``) the K/V modulation of the slot's layer for the chunk x.

        The layer is reached through its slot, and its index is read only for a cache's running
        state or a fused kernel: a compiled block traced without a cache (training) is then the
        same for every layer instead of being specialised, and compiled again, per index.
        """
        if self.merged:
            if torch.is_grad_enabled() and self.training:
                raise RuntimeError("Meta-KV is merged into the base weights: call unmerge_meta_kv(model) before training")
            slot.pending = None
            return
        if not self.enabled:
            slot.pending = None
            return
        real = None
        if self._padding_mask is not None:
            real = self._padding_mask[:, -x.shape[1] :]
            if real.shape[0] != x.shape[0]:
                raise ValueError(f"attention_mask has batch {real.shape[0]} but the input has batch {x.shape[0]}")
        states = None if cache is None else running_states(cache)
        state = None if states is None else states.get(slot.index)
        if state is not None and state[0].shape[0] != x.shape[0]:
            raise RuntimeError(
                f"the cache carries a Meta-KV state for {state[0].shape[0]} rows but the input has {x.shape[0]}; "
                "change a cache's rows through its own methods (reorder_cache, batch_select_indices, "
                "batch_repeat_interleave), which move the state too"
            )
        memory_state = None if slot.memory is None else slot.memory.state()
        # the kernel writes the state in place, so it needs a static cache's buffers (a new
        # sequence's first chunk, with no state yet, runs the torch path, which allocates them)
        state_in_buffers = states is not None and states.in_place and (state is not None or slot.layer.source is None)
        if state_in_buffers and self._fused_steps is not None and real is None and x.shape[1] == 1 \
                and not torch.is_grad_enabled() and self._fused_steps[slot.index] is not None:
            # Run by the first K/V projection's hook, adding straight into its output and the state's buffers.
            slot.pending = _FusedModulation(self._fused_steps[slot.index], x, state, memory_state)
            return
        # packed documents (transformers masks their attention apart only without a cache)
        documents = self._documents if cache is None else None
        delta, new_state = slot.layer(x, real, state, memory_state, documents)
        if states is not None and new_state is not None:
            states.advance(slot.index, x.shape[1], new_state)
        slot.pending = delta

    def hook(self, model: nn.Module) -> None:
        """Register the decoder, attention and projection hooks on ``model``.

        Hooks are small objects holding this module (not closures), so ``copy.deepcopy`` of the
        model (a teacher for distillation, say) gives a copy whose hooks drive the copy.
        """
        decoder = model.base_model
        self._hooks.append(decoder.register_forward_pre_hook(_PaddingHook(self, decoder), with_kwargs=True))
        for site, slot in zip(self.sites, self.slots):
            self._hooks.append(site.attention.register_forward_pre_hook(_AttentionHook(self, slot), with_kwargs=True))
            self._hooks.append(site.attention.register_forward_hook(_ClearHook(slot), with_kwargs=True))
            for module, target in self.adapter.output_hook_points(site):
                self._hooks.append(module.register_forward_hook(_ProjectionHook(self, slot, target)))

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def set_merged(self, merged: bool) -> None:
        """Fold the consolidated modulation into the base weights (True) or take it out (False)."""
        if self.config.source != "consolidated":
            raise ValueError(
                f"only a purely consolidated meta-state can be merged (it is constant); source is {self.config.source!r}"
            )
        if merged == self.merged:
            raise RuntimeError(f"Meta-KV is already {'merged' if merged else 'unmerged'}")
        for index, (site, layer) in enumerate(zip(self.sites, self.layers)):
            memory = self.memory_for(index)
            c = memory.state().detach().to(layer.modulation.A.dtype)
            self.adapter.add_weights(site, delta_weights(layer.modulation, site.hidden_size, c), 1.0 if merged else -1.0)
        self.merged = merged


def _argument(signature: inspect.Signature, args, kwargs, name: str):
    """The value of argument ``name`` in a call (None if not passed).

    Keyword arguments are read directly; binding the signature (slow on this hot path) is
    only needed when the argument came positionally.
    """
    if name in kwargs:
        return kwargs[name]
    return signature.bind_partial(*args, **kwargs).arguments.get(name)


def real_queries(mask: torch.Tensor, past: int) -> torch.Tensor:
    """Which queries of a 4-D attention mask are real tokens, as a ``[batch, queries]`` bool mask.

    Query t sits at key slot ``past + t``. A real token attends to itself and to no later slot;
    a padding token attends to nothing, or (where transformers lets a fully masked row attend
    everywhere, to keep SDPA finite) to later slots too.

    Args:
        mask: ``[batch, 1 or heads, queries, keys]``, bool (True = attend) or additive float (0 = attend).
        past: tokens already in the cache before these queries.
    """
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    queries, keys = allowed.shape[-2:]
    if past + queries > keys:
        raise ValueError(f"a 4-D attention mask with {keys} key slots cannot cover {past} cached and {queries} new tokens")
    slots = torch.arange(past, past + queries, device=mask.device)
    itself = allowed[:, torch.arange(queries, device=mask.device), slots]
    later = (allowed & (torch.arange(keys, device=mask.device) > slots[:, None])).any(-1)
    return itself & ~later


class _PaddingHook:
    """Decoder pre-hook: remember which tokens of this call are real (None if there is no mask, the
    mask is all real, or a 4-D mask covers one query) and, for a dynamic source, the packed
    documents of its rows.

    An all-real mask is dropped (one host sync per call, outside compiled graphs), so that each
    layer skips its padding work: in one-token decoding that is a third of Meta-KV's kernels.
    Documents are found exactly where transformers finds them to mask attention block-diagonally:
    restarting ``position_ids``, no attention mask, no cache.
    """

    def __init__(self, meta_kv: MetaKV, decoder: nn.Module):
        self.meta_kv, self.signature = meta_kv, inspect.signature(decoder.forward)

    def __call__(self, module, args, kwargs):
        mask = _argument(self.signature, args, kwargs, "attention_mask")
        if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
            # generate() with a static cache passes a 4-D mask already; a decoded token
            # (one query) is never padding, so only a prefill needs reading it
            cache = passed_cache(self.signature, args, kwargs)
            past = 0 if cache is None else int(cache.get_seq_length())
            self.meta_kv._padding_mask = real_queries(mask, past)
        elif mask is None or mask.dim() != 2 or (not torch.compiler.is_compiling() and bool(mask.all())):
            self.meta_kv._padding_mask = None
        else:
            self.meta_kv._padding_mask = mask.bool()
        self.meta_kv._documents = None
        if mask is None and self.meta_kv.config.dynamic_source is not None:
            positions = _argument(self.signature, args, kwargs, "position_ids")
            if positions is not None and passed_cache(self.signature, args, kwargs) is None:
                inputs = _argument(self.signature, args, kwargs, "input_ids")
                if inputs is None:
                    inputs = _argument(self.signature, args, kwargs, "inputs_embeds")
                # one row of positions may stand for every row, as transformers reads it
                segments = find_packed_sequence_indices(positions.expand(inputs.shape[0], -1))
                self.meta_kv._documents = None if segments is None else PackedDocuments(segments)


class _LayerSlot:
    """What the hooks of one attention layer share: its Meta-KV layer, its consolidated memory, and
    the modulation its attention pre-hook computed for the projection hooks to add (``pending``)."""

    def __init__(self, meta_kv: MetaKV, index: int):
        self.index = index
        self.layer = meta_kv.layers[index]
        self.memory = meta_kv.memory_for(index)
        self.pending: torch.Tensor | _FusedModulation | None = None


class _AttentionHook:
    """Attention pre-hook: compute the layer's K/V modulation for this chunk."""

    def __init__(self, meta_kv: MetaKV, slot: _LayerSlot):
        self.meta_kv, self.slot = meta_kv, slot
        forward = meta_kv.sites[slot.index].attention.forward
        cache_argument_name(forward)  # refuses, at hook time, an attention module that takes no cache
        self.signature = inspect.signature(forward)

    def __call__(self, module, args, kwargs):
        hidden_states = args[0] if args else _argument(self.signature, args, kwargs, "hidden_states")
        cache = passed_cache(self.signature, args, kwargs)
        self.meta_kv.layer_forward(self.slot, hidden_states, cache)


class _ClearHook:
    """Attention post-hook: drop the stashed modulation once the layer is done."""

    def __init__(self, slot: _LayerSlot):
        self.slot = slot

    def __call__(self, module, args, kwargs, output):
        self.slot.pending = None


class _FusedModulation:
    """A decoded token's fused Meta-KV step, waiting for the projection outputs it adds into."""

    def __init__(self, step, x: torch.Tensor, state, memory_state: torch.Tensor | None):
        self.step, self.x, self.state, self.memory_state = step, x, state, memory_state

    def __call__(self, k_out: torch.Tensor | None, v_out: torch.Tensor | None) -> torch.Tensor | None:
        """Add the modulation into the given outputs (updating the state in place); return the
        [K | V] delta of a target whose projection has not run yet, else None."""
        return self.step(self.x, self.state, self.memory_state, k_out=k_out, v_out=v_out)


class _ProjectionHook:
    """K/V projection post-hook: add the stashed modulation to the projection's output."""

    def __init__(self, meta_kv: MetaKV, slot: _LayerSlot, target: int | None):
        self.meta_kv, self.slot, self.target = meta_kv, slot, target

    def __call__(self, module, inputs, output):
        pending = self.slot.pending
        if isinstance(pending, _FusedModulation):
            # The kernel adds this projection's targets in place; a later projection adds the rest.
            self.slot.pending = pending(*self.meta_kv.adapter.output_targets(output, self.target))
            return output
        return output if pending is None else self.meta_kv.adapter.add_delta(output, pending, self.target)


def get_meta_kv(model: nn.Module) -> MetaKV:
    """The :class:`MetaKV` module of ``model`` (through a peft wrapper too).

    Raises:
        ValueError: if the model has no Meta-KV.
    """
    for module in model.modules():
        if isinstance(module, MetaKV):
            return module
    raise ValueError(f"{type(model).__name__} has no Meta-KV: call add_meta_kv(model, MetaKVConfig(...)) first")


def has_meta_kv(model: nn.Module) -> bool:
    return any(isinstance(module, MetaKV) for module in model.modules())


def add_meta_kv(model: nn.Module, config: MetaKVConfig | None = None) -> nn.Module:
    """Add Meta-KV attention to a loaded transformers causal LM, in place.

    Args:
        model: a causal LM of a registered family (:mod:`metakv_cl.modeling.families`).
        config: the Meta-KV configuration (default ``MetaKVConfig()``).

    Returns:
        The same model object, now computing modulated K and V. At initialisation it computes
        exactly what it computed before (B starts at zero).

    Raises:
        ValueError: an unregistered model type, a rank above the head dimension, or a model that
            already has Meta-KV.
    """
    config = config or MetaKVConfig()
    if has_meta_kv(model):
        raise ValueError("the model already has Meta-KV; remove_meta_kv(model) first")
    adapter, sites = attention_sites(model)
    head_dim = sites[0].head_dim
    if config.rank > head_dim:
        raise ValueError(
            f"meta_kv.rank: rank {config.rank} is larger than the head dimension {head_dim} of this model; "
            f"give a rank from 1 to {head_dim}"
        )
    base_parameter = next(model.parameters())
    meta_kv = MetaKV(config, adapter, sites).to(device=base_parameter.device, dtype=base_parameter.dtype)
    meta_kv.train(model.training)
    model.add_module("meta_kv", meta_kv)
    meta_kv.hook(model)
    return model


def remove_meta_kv(model: nn.Module) -> nn.Module:
    """Remove Meta-KV (hooks and parameters), restoring the base model; merged weights are unmerged."""
    meta_kv = get_meta_kv(model)
    if meta_kv.merged:
        meta_kv.set_merged(False)
    _detach(model, meta_kv)
    return model


def merge_and_remove_meta_kv(model: nn.Module) -> nn.Module:
    """Fold the consolidated modulation into the K/V projection weights for good and remove Meta-KV.

    Returns:
        The same model, now a plain transformers model whose K/V projections compute what the
        Meta-KV model computed.

    Raises:
        ValueError: the meta-state is not purely consolidated (a dynamic one depends on the input).
    """
    meta_kv = get_meta_kv(model)
    if not meta_kv.merged:
        meta_kv.set_merged(True)
    _detach(model, meta_kv)
    return model


def _detach(model: nn.Module, meta_kv: MetaKV) -> None:
    meta_kv.remove_hooks()
    for module in model.modules():
        for name, child in list(module.named_children()):
            if child is meta_kv:
                delattr(module, name)


def merge_meta_kv(model: nn.Module) -> nn.Module:
    """Fold the consolidated modulation into the K/V projection weights: zero-overhead inference."""
    get_meta_kv(model).set_merged(True)
    return model


def unmerge_meta_kv(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_meta_kv`."""
    get_meta_kv(model).set_merged(False)
    return model


def compile_meta_kv(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile each layer's Meta-KV computation (source, modulation, padding) with ``torch.compile``.

    For cached decoding, where the model runs one token at a time and every small operation costs
    a kernel launch: each layer's Meta-KV work becomes a few fused kernels. For training, compile
    the whole model instead (``torch.compile(model)`` traces through the hooks). Parameters and
    state-dict keys are unchanged.

    Args:
        compile_kwargs: passed to ``torch.compile`` (for example ``mode`` or ``dynamic``).

    Returns:
        The same model.
    """
    for layer in get_meta_kv(model).layers:
        layer.compile(**compile_kwargs)
    return model


def meta_kv_parameters(model: nn.Module, group: str = "all") -> list[nn.Parameter]:
    """The Meta-KV parameters of one group.

    Args:
        group: ``"memory"`` (the consolidated state M or the addressed banks), ``"generator"`` (A, B and the
            generators that map C to them), ``"source"`` (the dynamic source) or ``"all"``.
    """
    if group not in PARAMETER_GROUPS:
        raise ValueError(f"unknown Meta-KV parameter group {group!r}; choose one of {', '.join(PARAMETER_GROUPS)}")
    meta_kv = get_meta_kv(model)
    if group == "all":
        return list(meta_kv.parameters())
    if group == "memory":  # M, or the addressed banks
        return list(meta_kv.memories.parameters()) + [p for layer in meta_kv.layers if layer.bank is not None
                                                      for p in layer.bank.parameters()]
    part = "modulation" if group == "generator" else "source"
    return [p for layer in meta_kv.layers if getattr(layer, part) is not None for p in getattr(layer, part).parameters()]


def freeze_base(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter that is not a Meta-KV parameter."""
    meta = {id(p) for p in meta_kv_parameters(model)}
    for parameter in model.parameters():
        if id(parameter) not in meta:
            parameter.requires_grad_(False)
    return model


class SlotReadRecorder:
    """Sums each addressed bank's read weights over the real tokens the model reads while recording.

    Use as a context manager around forward passes of a model with ``source="addressed"``: on
    exit the hooks are gone and :attr:`sums` ([layers, slots], float64) and :attr:`tokens` hold
    what was read; :meth:`mean` is the mean read distribution per layer.

    Args:
        model: a model with Meta-KV attention whose source is ``"addressed"``.

    Raises:
        ValueError: the model has no Meta-KV, or its layers have no addressed bank.
    """

    def __init__(self, model: nn.Module):
        self.meta_kv = get_meta_kv(model)
        if not self.meta_kv.config.uses_bank:
            raise ValueError(
                f"reading slots needs source 'addressed'; this model's source is {self.meta_kv.config.source!r}"
            )
        slots = self.meta_kv.config.memory_slots
        self.sums = torch.zeros(len(self.meta_kv.layers), slots, dtype=torch.float64)
        self.tokens = 0
        self._hooks: list = []

    def __enter__(self) -> "SlotReadRecorder":
        for index, layer in enumerate(self.meta_kv.layers):
            self._hooks.append(layer.bank.register_forward_hook(self._reader(index)))
        return self

    def __exit__(self, *exc_info) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _reader(self, layer: int):
        def record(bank: AddressedMemory, args, output) -> None:
            summary = args[0]
            with torch.no_grad():
                weights = bank.read_weights(summary).double()  # [batch, time, slots]
                mask = self.meta_kv._padding_mask
                if mask is None:
                    real = torch.ones(weights.shape[:2], dtype=torch.double, device=weights.device)
                else:  # the same real tokens as the layer's own forward (a cached chunk is the mask's tail)
                    real = mask[:, -weights.shape[1]:].double()
                self.sums[layer] += (weights * real.unsqueeze(-1)).sum(dim=(0, 1)).cpu()
                if layer == 0:
                    self.tokens += int(real.sum())

        return record

    def mean(self) -> torch.Tensor:
        """The mean read weights per layer over the recorded tokens, [layers, slots] (each row sums to 1).

        Raises:
            ValueError: no token was recorded.
        """
        if self.tokens == 0:
            raise ValueError("no token was read from the bank while recording")
        return self.sums / self.tokens
