"""Cached decoding with every one-token step replayed from a CUDA graph.

One-token decoding of a small model is launch-bound: the GPU finishes each kernel before the
host has issued the next one, and Meta-KV's hooks add more small kernels per layer. A CUDA
graph records one whole decoding step (embedding, every layer with its Meta-KV work, the output
head and the choice of the next token) and replays it with one launch.

A graph replays fixed memory addresses, so everything a step reads or writes lives in static
buffers: a transformers ``StaticCache`` for K and V, the Meta-KV running state beside it (a
static cache keeps it in fixed buffers written in place, see
:class:`~metakv_cl.modeling.cache_state.RunningStates`), and this module's token, position, mask
and output buffers. The step advances them itself, so the host only replays.

The prompt is prefilled eagerly (any length, left padding allowed); the graph is captured once
per decoder and reused by later ``generate`` calls of the same batch size. Without CUDA (or with
``cuda_graph=False``) the same step runs eagerly, which is how the CPU tests check that it
decodes exactly what ``model.generate`` decodes.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import StaticCache

from metakv_cl.modeling.meta_kv import get_meta_kv, has_meta_kv
from metakv_cl.transformers_api import with_cache


class GraphedDecoder:
    """Greedy or sampled decoding of a causal LM (plain or Meta-KV) through a CUDA graph.

    Args:
        model: a transformers causal LM, in eval mode, with an eager or SDPA attention.
        batch_size: the batch size every ``generate`` call uses.
        max_cache_len: prompt length plus new tokens may not exceed this.
        cuda_graph: capture the step into a CUDA graph (default: when the model is on CUDA).
        fused_meta_kv: run Meta-KV's one-token work through its fused kernel where the layer
            supports it (needs Triton; the weights are packed once, so build a new decoder after
            changing them).
        warmup_steps: eager steps before the capture (CUDA needs its libraries initialised on a
            side stream before a capture); they decode real tokens.

    Example:
        >>> decoder = GraphedDecoder(model, batch_size=1, max_cache_len=1088)
        >>> new_tokens = decoder.generate(prompt_ids, max_new_tokens=64)
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        max_cache_len: int,
        cuda_graph: bool | None = None,
        fused_meta_kv: bool = False,
        warmup_steps: int = 2,
    ):
        if model.training:
            raise ValueError("GraphedDecoder decodes with a model in eval mode: call model.eval() first")
        attention = getattr(model.config, "_attn_implementation", "eager")
        if attention not in ("eager", "sdpa"):
            raise ValueError(f"GraphedDecoder passes an additive 4-D attention mask, which {attention!r} attention does not take; use 'sdpa' or 'eager'")
        positions = getattr(model.config, "max_position_embeddings", None)  # GPT-2's config maps it to n_positions
        if positions is not None and max_cache_len > positions:
            raise ValueError(f"max_cache_len {max_cache_len} exceeds the model's {positions} positions")
        text_config = model.config.get_text_config(decoder=True)
        window = getattr(text_config, "sliding_window", None)
        layer_types = getattr(text_config, "layer_types", None) or ()
        if window is not None and max_cache_len > window and any(kind != "full_attention" for kind in layer_types):
            # the static cache's sliding layers hold `window` slots, and the one captured mask covers max_cache_len
            raise ValueError(f"GraphedDecoder masks every layer over max_cache_len slots, but this model's sliding-window "
                             f"layers hold {window}; use max_cache_len <= {window}, or "
                             "model.generate(cache_implementation='static') for longer sequences")
        parameter = next(model.parameters())
        self.model, self.batch_size, self.max_cache_len = model, batch_size, max_cache_len
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {self.device}")
        self.warmup_steps = warmup_steps
        self.meta_kv = get_meta_kv(model) if has_meta_kv(model) else None
        if fused_meta_kv:
            if self.meta_kv is None:
                raise ValueError("fused_meta_kv=True needs a model with Meta-KV")
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(f"fused_meta_kv=True runs a Triton kernel, which needs the model on a CUDA device, not {self.device} "
                                 "(or TRITON_INTERPRET=1, for tests)")
        # A captured graph reads the fused steps' packed weights and scratch: keep them alive with it.
        self.fused_steps = self.meta_kv.enable_fused_decoding() if fused_meta_kv else None
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.cache_argument = with_cache(model, self.cache)
        batch, device = batch_size, self.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot of the current token
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # the output column it produces
        # Additive mask over the cache slots: 0 where a token may attend, the dtype's minimum elsewhere.
        self.mask = torch.zeros(batch, 1, 1, max_cache_len, dtype=self.dtype, device=device)
        self.temperature = torch.zeros(1, dtype=torch.float32, device=device)
        # Room for every token a call can produce, so one captured graph serves any max_new_tokens.
        self.output = torch.zeros(batch, max_cache_len, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.sample = False

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> torch.Tensor:
        """Decode ``max_new_tokens`` tokens after the prompt.

        Args:
            input_ids: [batch, prompt] token ids (left-padded if rows differ in length).
            attention_mask: [batch, prompt], 1 on real tokens, 0 on padding (default all 1).
            temperature: 0 for greedy decoding, else sampling from softmax(logits / temperature).
            eos_token_id: once a row produced it, its later tokens are replaced by pad_token_id.

        Returns:
            [batch, max_new_tokens] the new tokens.
        """
        batch, prompt = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"this decoder was built for batch {self.batch_size}, got {batch}")
        if prompt + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt {prompt} + {max_new_tokens} new tokens exceed max_cache_len {self.max_cache_len}")
        if max_new_tokens < 1 or temperature < 0:
            raise ValueError(f"need max_new_tokens >= 1 and temperature >= 0, got {max_new_tokens} and {temperature}")
        if self.graph is not None and (temperature > 0) != self.sample:
            raise ValueError("the captured graph decodes greedily or samples, not both: use another GraphedDecoder")
        self.sample = temperature > 0
        self.temperature.fill_(max(temperature, 1e-6))
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)

        first = self._prefill(input_ids, attention_mask)
        self.output[:, :1] = first
        steps = max_new_tokens - 1
        if self.graph is None and self.cuda_graph and steps > self.warmup_steps:
            self._capture()
            steps -= self.warmup_steps
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        new_tokens = self.output[:, :max_new_tokens].clone()
        if eos_token_id is not None:
            is_eos = (new_tokens == eos_token_id).long()
            new_tokens[is_eos.cumsum(dim=1) - is_eos > 0] = pad_token_id  # after a row's first EOS
        return new_tokens

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt eagerly into the reset cache; set the step buffers; return the first new token."""
        self.cache.reset()
        if self.meta_kv is not None:
            self.meta_kv.reset_running_state(self.cache)
        prompt = input_ids.shape[1]
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **self.cache_argument
        ).logits[:, -1]
        first = self._choose(logits)
        self.tokens.copy_(first)
        self.positions.copy_(positions[:, -1:] + 1)
        self.slot.fill_(prompt)
        self.step_index.fill_(1)
        self.mask.fill_(torch.finfo(self.dtype).min)
        self.mask[:, 0, 0, :prompt].masked_fill_(attention_mask.bool(), 0.0)
        return first

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token [batch, 1]: argmax, or a Gumbel-max sample (no host sync, graph-safe)."""
        logits = logits.float()
        if self.sample:
            uniform = torch.rand_like(logits).clamp_(min=1e-20)
            logits = logits / self.temperature - torch.log(-torch.log(uniform))
        return logits.argmax(dim=-1, keepdim=True)

    def _step(self) -> None:
        """Decode one token from the static buffers and advance them."""
        self.mask.index_fill_(-1, self.slot, 0.0)  # the new token attends to itself
        logits = self.model(
            input_ids=self.tokens, attention_mask=self.mask, position_ids=self.positions, use_cache=True, **self.cache_argument
        ).logits[:, -1]
        chosen = self._choose(logits)
        self.output.index_copy_(1, self.step_index, chosen)
        self.tokens.copy_(chosen)
        self.positions.add_(1)
        self.slot.add_(1)
        self.step_index.add_(1)

    def _capture(self) -> None:
        """Run the warm-up steps on a side stream, then record one step into a CUDA graph."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph
