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

    Attributes:
        states: the state after the cache's last chunk, per layer (absent: a new sequence).
        pinned: states kept at fixed addresses for CUDA graphs (see :meth:`pin`), or None.
        lengths: tokens each layer's state has read (padding included, as the cache counts).
        history: per layer, ``(length, state)`` before each of the last chunks, newest last.
    """

    def __init__(self) -> None:
        self.states: dict[int, State] = {}
        self.pinned: dict[int, State] | None = None
        self.lengths: dict[int, int] = {}
        self.history: dict[int, list[tuple[int, State | None]]] = {}

    def get(self, layer: int) -> State | None:
        return self.states.get(layer)

    def advance(self, layer: int, tokens: int, new_state: State | None, in_place: bool) -> None:
        """Record the state after a chunk of ``tokens`` tokens.

        Args:
            new_state: the state after the chunk; None when a kernel already wrote it in place.
            in_place: write it into the pinned tensors instead of replacing them.
        """
        old = self.states.get(layer)
        length = self.lengths.get(layer, 0)
        if in_place:
            if new_state is not None:
                for target, value in zip(old, new_state):
                    target.copy_(value)
            self.history.pop(layer, None)  # pinned tensors change in place: older entries would alias them
        else:
            boundaries = self.history.setdefault(layer, [])
            boundaries.append((length, old))
            del boundaries[:-HISTORY]
            self.states[layer] = new_state
        self.lengths[layer] = length + tokens

    def reset(self) -> None:
        """Start a new sequence; pinned tensors stay allocated for the next :meth:`pin`."""
        self.states, self.lengths, self.history = {}, {}, {}

    def pin(self) -> None:
        """Keep the states at fixed addresses from now on (the first call allocates them).

        Later chunks then update the tensors in place, so a CUDA graph that recorded a decoding
        step keeps reading and writing the live state. A compiled layer may return broadcast
        views, which cannot be written in place, so the first call pins dense copies; later calls
        copy a new prefill's states into them (the batch size must not change).

        Raises:
            ValueError: a new prefill's state has another shape than the pinned one.
        """
        if self.pinned is None:
            self.pinned = {layer: tuple(t.clone(memory_format=torch.contiguous_format) for t in state)
                           for layer, state in self.states.items()}
        else:
            for layer, state in self.states.items():
                for target, value in zip(self.pinned[layer], state):
                    if target.shape != value.shape:
                        raise ValueError(f"the pinned state has shape {tuple(target.shape)}, "
                                         f"the new prefill {tuple(value.shape)}")
                    target.copy_(value)
        self.states = dict(self.pinned)
        self.history = {}

    def is_pinned(self, layer: int) -> bool:
        return self.pinned is not None and self.states.get(layer) is self.pinned.get(layer)

    def map_rows(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-row operation (select, reorder, repeat) to every state, history included."""
        def apply(state: State | None) -> State | None:
            return None if state is None else tuple(rows(t) for t in state)

        if self.pinned is not None:
            moved = {layer: apply(state) for layer, state in self.pinned.items()}
            if all(new.shape == old.shape for layer in moved for new, old in zip(moved[layer], self.pinned[layer])):
                for layer, state in moved.items():  # same shapes: stay at the pinned addresses
                    for target, value in zip(self.pinned[layer], state):
                        target.copy_(value)
            else:
                self.pinned = None  # the batch size changed: a graph recorded for the old one cannot run
        self.states = {layer: (self.pinned[layer] if self.pinned is not None and self.pinned.get(layer) is state
                               else apply(state)) for layer, state in self.states.items()}
        self.history = {layer: [(length, apply(state)) for length, state in entries]
                        for layer, entries in self.history.items()}

    def crop_to(self, length: int) -> None:
        """Return every layer's state to the end of an earlier chunk that ended at ``length`` tokens.

        Raises:
            ValueError: ``length`` falls inside a chunk, or further back than the kept history:
                the state there was never materialised.
        """
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
        seen = max(states.lengths.values(), default=0)
        # a positive argument is transformers < 5.18's absolute length to keep
        target = seen + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, seen)
        saved = dict(states.states), dict(states.lengths), {layer: list(e) for layer, e in states.history.items()}
        states.crop_to(target)  # first: a crop the state cannot follow leaves the keys and values alone
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
        cache.meta_kv_states = RunningStates()
    return cache.meta_kv_states
