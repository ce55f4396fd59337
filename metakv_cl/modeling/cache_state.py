"""The Meta-KV running state, carried by the transformers cache whose keys and values it belongs to.

A dynamic meta-state summarises the tokens in the cache, so every operation that changes which
tokens or which rows the cache holds must change the state the same way: beam search reorders
rows (``reorder_cache``), contrastive and shared-prompt scoring repeat or select them
(``batch_repeat_interleave`` / ``batch_select_indices``), ``reset`` starts over, ``crop`` takes
tokens back (transformers' asynchronous stopping crops the step it ran past the end;
assisted decoding crops rejected candidates), and ``copy.deepcopy`` of a prefilled cache (the
prompt-reuse recipe) must copy the state too.

transformers calls those operations on the cache object it created, so the state lives on that
object: the first Meta-KV call on a cache mixes :class:`MetaKVCacheMixin` into the cache's
class (``DynamicCache`` becomes ``MetaKVDynamicCache``, a subclass, so every ``isinstance``
check still holds), and the mixin's overrides move the state along with the keys and values.
"""

from __future__ import annotations

from typing import Callable

import torch

State = tuple[torch.Tensor, ...]
HISTORY = 8  # chunk boundaries a crop can return to, per layer


class RunningStates:
    """Per-layer running states of one cache, with the recent chunk boundaries a crop can return to.

    A compileable cache (a transformers ``StaticCache``) keeps its keys and values in buffers
    allocated once and written in place, because transformers compiles its decoding step (with
    CUDA graphs on a GPU: ``mode="reduce-overhead"``), and a graph's outputs are overwritten by its
    next replay. The states of such a cache live the same way: each layer's state is a set of
    buffers at fixed addresses (marked static for ``torch.compile``) that every chunk writes in
    place, so a compiled step returns no state tensor that must outlive the next replay. Other
    caches keep each chunk's new state tensors as they come.

    Args:
        in_place: keep the states in fixed buffers, written in place (a compileable cache).

    Attributes:
        states: the state after the cache's last chunk, per layer (absent: a new sequence).
        buffers: with ``in_place``, the fixed buffers of each layer's state; they outlive
            :meth:`reset`, so every sequence on the cache uses the same addresses.
        lengths: tokens each layer's state has read (padding included, as the cache counts).
        history: per layer, ``(length, state)`` before each of the last chunks, newest last.

    With ``in_place``, ``lengths`` and ``history`` stay empty: buffers written in place keep no
    earlier state to return to, and a count kept here would be a Python int that a compiled step
    specialises on, recompiling (and re-recording its CUDA graph) at every token; the cache's own
    count, a tensor, stands for it.
    """

    def __init__(self, in_place: bool = False) -> None:
        self.in_place = in_place
        self.states: dict[int, State] = {}
        self.buffers: dict[int, State] = {}
        self.lengths: dict[int, int] = {}
        self.history: dict[int, list[tuple[int, State | None]]] = {}

    def get(self, layer: int) -> State | None:
        return self.states.get(layer)

    def advance(self, layer: int, tokens: int, new_state: State) -> None:
        """Record the state after a chunk of ``tokens`` tokens (with ``in_place``, write it into the buffers)."""
        if self.in_place:
            self.states[layer] = self._write(layer, new_state)
            return
        length = self.lengths.get(layer, 0)
        boundaries = self.history.setdefault(layer, [])
        boundaries.append((length, self.states.get(layer)))
        del boundaries[:-HISTORY]
        self.states[layer] = new_state
        self.lengths[layer] = length + tokens

    def _write(self, layer: int, values: State) -> State:
        """Copy ``values`` into the layer's buffers and return them.

        The first call allocates the buffers, as does a call whose shapes differ from them (a row
        operation that changed the batch size); generate() runs both the prefill and the row
        operations eagerly, so the buffers exist and are marked static before a compiled step
        reads them. A compiled layer may return broadcast views, which cannot be written in
        place, so the buffers are dense copies.
        """
        buffers = self.buffers.get(layer)
        if buffers is not None and all(b.shape == v.shape and b.dtype == v.dtype and b.device == v.device
                                       for b, v in zip(buffers, values)):
            for target, value in zip(buffers, values):
                target.copy_(value)
            return buffers
        buffers = tuple(value.clone(memory_format=torch.contiguous_format) for value in values)
        if not torch.compiler.is_compiling():  # marking is refused while tracing (as for StaticCache's own buffers)
            for buffer in buffers:
                torch._dynamo.mark_static_address(buffer)
        self.buffers[layer] = buffers
        return buffers

    def reset(self) -> None:
        """Start a new sequence; the buffers stay allocated for it."""
        self.states, self.lengths, self.history = {}, {}, {}

    def map_rows(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-row operation (select, reorder, repeat) to every state, history included."""
        def apply(state: State | None) -> State | None:
            return None if state is None else tuple(rows(t) for t in state)

        moved = {layer: apply(state) for layer, state in self.states.items()}
        self.states = {layer: self._write(layer, state) if self.in_place else state for layer, state in moved.items()}
        self.history = {layer: [(length, apply(state)) for length, state in entries]
                        for layer, entries in self.history.items()}

    def crop_to(self, length: int, seen: int) -> None:
        """Return every layer's state to the end of an earlier chunk that ended at ``length`` tokens.

        Args:
            length: the tokens to keep.
            seen: the tokens the cache holds now.

        Raises:
            ValueError: ``length`` falls inside a chunk, or further back than the kept history
                (the state there was never materialised); with ``in_place``, any ``length``
                below ``seen`` while a state exists.
        """
        if self.in_place:
            if self.states and length < seen:
                raise ValueError(
                    f"cannot crop the cache to {length} tokens: a static cache writes the dynamic Meta-KV state in "
                    f"place, so it keeps only the state after its last forward call ({seen} tokens); use a dynamic "
                    "cache, decode step by step (no assisted decoding) or use a consolidated source"
                )
            return
        for layer, current in list(self.lengths.items()):
            if length >= current:
                continue
            entries = self.history.get(layer, [])
            match = [i for i, (start, _) in enumerate(entries) if start == length]
            if not match:
                starts = [start for start, _ in entries]
                raise ValueError(
                    f"cannot crop the cache to {length} tokens: a dynamic Meta-KV state is kept only at the end of "
                    f"each of the last {HISTORY} forward calls (here after {starts + [current]} tokens), not inside "
                    "one; decode step by step (no assisted decoding) or use a consolidated source"
                )
            index = match[-1]
            state = entries[index][1]
            if state is None:
                self.states.pop(layer, None)
            else:
                self.states[layer] = state
            self.lengths[layer] = length
            del entries[index:]


class MetaKVCacheMixin:
    """Mixed into a transformers cache class so that its operations carry the Meta-KV state along."""

    meta_kv_states: RunningStates
    carried_class: type  # the transformers cache class this one extends

    def __reduce_ex__(self, protocol):
        # the mixed class is made at run time: copies and pickles rebuild it from the cache class
        return _carrying_instance, (self.carried_class,), self.__dict__

    def reset(self) -> None:
        super().reset()
        self.meta_kv_states.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.meta_kv_states.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.meta_kv_states.map_rows(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.meta_kv_states.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        states = self.meta_kv_states
        # in-place states keep no count of their own (see RunningStates): the static cache's stands for it
        seen = int(super().get_seq_length()) if states.in_place else max(states.lengths.values(), default=0)
        # a positive argument is transformers < 5.18's absolute length to keep
        target = seen + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, seen)
        saved = dict(states.states), dict(states.lengths), {layer: list(e) for layer, e in states.history.items()}
        states.crop_to(target, seen)  # first: a crop the state cannot follow leaves the keys and values alone
        try:
            super().crop(tokens_to_remove)
        except Exception:  # the cache refused (transformers >= 5.18 refuses a positive argument)
            states.states, states.lengths, states.history = saved
            raise


_CARRYING_CLASSES: dict[type, type] = {}


def _carrying_class(cls: type) -> type:
    if cls not in _CARRYING_CLASSES:
        _CARRYING_CLASSES[cls] = type(f"MetaKV{cls.__name__}", (MetaKVCacheMixin, cls), {"carried_class": cls})
    return _CARRYING_CLASSES[cls]


def _carrying_instance(cls: type):
    return object.__new__(_carrying_class(cls))


def running_states(cache) -> RunningStates:
    """The Meta-KV running states carried by ``cache``, mixing :class:`MetaKVCacheMixin` into its class on first use."""
    if not isinstance(cache, MetaKVCacheMixin):
        cache.__class__ = _carrying_class(type(cache))
        # transformers compiles the decoding step of a compileable cache: its states must stay in place
        cache.meta_kv_states = RunningStates(in_place=cache.is_compileable)
    return cache.meta_kv_states
