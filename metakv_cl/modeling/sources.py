"""Meta-state sources: where the meta-state C of a layer comes from.

Every dynamic source is causal (C at token t sees tokens <= t only) and has ONE code path for a
whole sequence and for one decoding step: ``forward(x, real, state)`` reads a chunk of tokens
plus the running state left by earlier chunks, and returns C for the chunk and the new state.
A full forward is one chunk; cached decoding is many chunks of one token; the two therefore
compute the same C (up to float rounding).

Shapes: x [batch, time, hidden]; real [batch, time] bool (False on padding) or None;
C [batch, time, state_dim]. Sources compute in float32 whatever the autocast setting, so the
running sums stay exact enough for long inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

State = tuple[torch.Tensor, ...]


def _float32(module_forward):
    """Run a source's forward in float32 with autocast off, returning C in the input dtype."""

    def wrapper(self, x, real, state):
        with torch.autocast(device_type=x.device.type, enabled=False):
            c, new_state = module_forward(self, x.float(), real, state)
        return c.to(x.dtype), new_state

    return wrapper


def _real_mask(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    if real is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return real


def causal_weighted_mean(values: torch.Tensor, weights: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
    """C_t = sum_{s<=t} w_s v_s / sum_{s<=t} w_s, continuing the running sums in ``state``.

    Args:
        values: [batch, time, dim].
        weights: [batch, time, 1], zero on padding.
        state: (weighted sum [batch, dim], weight total [batch, 1]) or None.

    Returns:
        C [batch, time, dim] (zero where nothing has been seen yet) and the new state.
    """
    numerator = torch.cumsum(weights * values, dim=1)
    denominator = torch.cumsum(weights, dim=1)
    if state is not None:
        numerator = numerator + state[0].unsqueeze(1)
        denominator = denominator + state[1].unsqueeze(1)
    # Before the first real token both sums are 0; the floor makes C = 0 there (and only there:
    # a real token's weight is far above it).
    c = numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    return c, (numerator[:, -1], denominator[:, -1])


class _ProjectedSource(nn.Module):
    """A source that summarises a linear projection of the layer input to ``state_dim``."""

    def __init__(self, hidden_size: int, state_dim: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, state_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(hidden_size))


class MeanSource(_ProjectedSource):
    """Running mean of a projection of the layer input."""

    @_float32
    def forward(self, x, real, state):
        weights = _real_mask(x, real).unsqueeze(-1).float()
        return causal_weighted_mean(F.linear(x, self.proj.weight.float()), weights, state)


class AttentivePoolingSource(nn.Module):
    """A learned query pools the prefix: C_t = sum_{s<=t} softmax_s(q . k_s) v_s.

    The query does not depend on t, so the softmax over the prefix is a weighted running mean
    with weights exp(score_s - bound); scores are bounded by ``bound * tanh(score / bound)``
    so these weights never underflow in float32 (exp(-2 bound) stays representable), which
    keeps step-by-step decoding equal to a full pass without a running max.
    """

    def __init__(self, hidden_size: int, state_dim: int, score_bound: float):
        super().__init__()
        self.key = nn.Linear(hidden_size, state_dim, bias=False)
        self.value = nn.Linear(hidden_size, state_dim, bias=False)
        self.query = nn.Parameter(torch.randn(state_dim) / math.sqrt(state_dim))
        self.score_bound = score_bound
        for linear in (self.key, self.value):
            nn.init.normal_(linear.weight, std=1.0 / math.sqrt(hidden_size))

    @_float32
    def forward(self, x, real, state):
        keys = F.linear(x, self.key.weight.float())
        scores = keys @ self.query.float() / math.sqrt(keys.shape[-1])
        scores = self.score_bound * torch.tanh(scores / self.score_bound)
        weights = torch.exp(scores - self.score_bound) * _real_mask(x, real).float()
        return causal_weighted_mean(F.linear(x, self.value.weight.float()), weights.unsqueeze(-1), state)


class MaxSource(_ProjectedSource):
    """Running element-wise max of a projection of the layer input."""

    @_float32
    def forward(self, x, real, state):
        projected = F.linear(x, self.proj.weight.float())
        projected = projected.masked_fill(~_real_mask(x, real).unsqueeze(-1), float("-inf"))
        running = torch.cummax(projected, dim=1).values
        if state is not None:
            running = torch.maximum(running, state[0].unsqueeze(1))
        c = torch.where(torch.isfinite(running), running, 0.0)
        return c, (running[:, -1],)


class RecurrentSource(nn.Module):
    """A GRU over the layer input; C_t is its hidden state after token t. Padding is skipped."""

    def __init__(self, hidden_size: int, state_dim: int):
        super().__init__()
        self.gru = nn.GRU(hidden_size, state_dim, batch_first=True)

    @_float32
    def forward(self, x, real, state):
        batch, time, _ = x.shape
        h0 = (
            state[0].unsqueeze(0)
            if state is not None
            else x.new_zeros(1, batch, self.gru.hidden_size)
        )
        # Run the GRU on float32 copies of its weights (the same tensors when they already are
        # float32) without changing the module's own dtype.
        weights = {name: parameter.float() for name, parameter in self.gru.named_parameters()}

        def gru(inputs):
            return torch.func.functional_call(self.gru, weights, (inputs, h0))

        if real is None or bool(real.all()):
            c, h_n = gru(x)
            return c, (h_n[0],)
        # Move each row's real tokens to the front (keeping their order), run them packed, and
        # scatter the outputs back: padding never touches the recurrent state.
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        lengths = real.sum(dim=1)
        front = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))
        packed = pack_padded_sequence(front, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=time)
        c = torch.zeros_like(out).scatter(1, order.unsqueeze(-1).expand_as(out), out)
        c = c * real.unsqueeze(-1)
        h_n = torch.where((lengths > 0).unsqueeze(-1), h_n[0], h0[0])
        return c, (h_n,)


class PackedDocuments:
    """The documents of packed rows, so that a dynamic source summarises each document alone.

    Packed rows hold several documents back to back, told apart by position ids that restart
    (transformers' ``find_packed_sequence_indices`` gives the segment ids). :meth:`split` moves
    the tokens into one right-padded row per document, where a source runs exactly as on the
    unpacked documents; :meth:`merge` puts its output back in the packed layout.

    Args:
        segments: [batch, time] the index of each token's document within its row (0, 0, 1, ...).
    """

    def __init__(self, segments: torch.Tensor):
        batch, time = segments.shape
        per_row = segments[:, -1] + 1
        first = torch.cumsum(per_row, 0) - per_row  # global index of each row's first document
        self.document = segments + first.unsqueeze(1)  # [batch, time]
        steps = torch.arange(time, device=segments.device).expand(batch, time)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        start = torch.cummax(torch.where(starts, steps, 0), dim=1).values
        self.offset = steps - start  # [batch, time] position within the document
        self.count, self.length = int(per_row.sum()), int(self.offset.max()) + 1

    def split(self, values: torch.Tensor) -> torch.Tensor:
        """[batch, time, ...] -> [documents, longest document, ...], zero after each document."""
        out = values.new_zeros((self.count, self.length, *values.shape[2:]))
        out[self.document, self.offset] = values
        return out

    def merge(self, values: torch.Tensor) -> torch.Tensor:
        """[documents, longest document, ...] -> [batch, time, ...]."""
        return values[self.document, self.offset]


class ConsolidatedMemory(nn.Module):
    """The consolidated state M: ``memory_slots`` learnable vectors whose mean is C.

    M does not depend on the input, so C is the same for every token and the modulation it
    produces can be merged into the projection weights.
    """

    def __init__(self, memory_slots: int, state_dim: int):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(memory_slots, state_dim) / math.sqrt(state_dim))

    def state(self) -> torch.Tensor:
        """C as a [state_dim] vector."""
        return self.slots.mean(dim=0)


class AddressedMemory(nn.Module):
    """A bank of slots that each token reads by content: C_t = sum_j softmax_j(q(s_t) . k_j / sqrt(d)) v_j.

    s_t is a causal summary of the context (a dynamic source's output), so each input selects
    its own mixture of slots without a task id, and C_t stays causal with no state of its own.
    Only open slots are read (all of them, unless :meth:`open_slots` says otherwise), so a
    schedule can open a group of slots per experience while the bank's shape, and so its
    checkpoints, stays fixed.

    Args:
        slots: the bank's capacity.
        state_dim: dimension of s_t, of the slot keys and values, and of C.
    """

    def __init__(self, slots: int, state_dim: int):
        super().__init__()
        self.query = nn.Linear(state_dim, state_dim, bias=False)
        self.keys = nn.Parameter(torch.randn(slots, state_dim) / math.sqrt(state_dim))
        self.values = nn.Parameter(torch.randn(slots, state_dim) / math.sqrt(state_dim))
        nn.init.normal_(self.query.weight, std=1.0 / math.sqrt(state_dim))
        self.register_buffer("open", torch.ones(slots, dtype=torch.bool))

    def open_slots(self, count: int) -> None:
        """Make the first ``count`` slots readable and the rest not.

        Raises:
            ValueError: ``count`` is not between 1 and the bank's capacity.
        """
        if not 1 <= count <= self.open.numel():
            raise ValueError(f"open slots must be between 1 and the bank's {self.open.numel()} slots, got {count}")
        self.open.copy_(torch.arange(self.open.numel(), device=self.open.device) < count)

    def read_weights(self, summary: torch.Tensor) -> torch.Tensor:
        """Each token's weights over the slots, [batch, time, slots] (zero on closed slots)."""
        with torch.autocast(device_type=summary.device.type, enabled=False):
            scores = F.linear(summary.float(), self.query.weight.float()) @ self.keys.float().T
            scores = (scores / math.sqrt(self.keys.shape[-1])).masked_fill(~self.open, float("-inf"))
            return torch.softmax(scores, dim=-1)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        """C [batch, time, state_dim] read with the summaries s [batch, time, state_dim]."""
        return (self.read_weights(summary) @ self.values.float()).to(summary.dtype)


def build_dynamic_source(name: str, hidden_size: int, state_dim: int, score_bound: float) -> nn.Module:
    """The dynamic source called ``name`` ("mean", "max", "attentive" or "recurrent")."""
    if name == "mean":
        return MeanSource(hidden_size, state_dim)
    if name == "max":
        return MaxSource(hidden_size, state_dim)
    if name == "attentive":
        return AttentivePoolingSource(hidden_size, state_dim, score_bound)
    if name == "recurrent":
        return RecurrentSource(hidden_size, state_dim)
    raise ValueError(f"unknown dynamic meta-state source {name!r}; choose mean, max, attentive or recurrent")
