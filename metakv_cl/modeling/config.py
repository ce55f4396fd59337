"""MetaKVConfig: every knob of the Meta-KV modulation in one dataclass."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from metakv_cl.files import read_json

DYNAMIC_SOURCES = ("mean", "max", "attentive", "recurrent")
SOURCES = DYNAMIC_SOURCES + ("consolidated", "hybrid", "addressed")
FORMS = ("factorized", "hypernetwork")
CORES = ("matrix", "gate")


@dataclass
class MetaKVConfig:
    """Configuration of the Meta-KV modulation ``K = X W_k + alpha * (X A_k(C)) B_k(C)`` (same for V).

    Args:
        source: where the meta-state C comes from. Dynamic (causal summaries of the sequence so
            far): ``"mean"``, ``"max"``, ``"attentive"`` (a learned query pools the prefix),
            ``"recurrent"`` (a GRU state). ``"consolidated"``: a learned state M, fixed during
            inference and updated between tasks. ``"hybrid"``: ``hybrid_dynamic`` plus M.
            ``"addressed"``: each token reads a bank of ``memory_slots`` slots by content,
            addressed with the causal summary ``addressed_summary`` (a memory that every input
            reads differently; see :class:`~metakv_cl.modeling.sources.AddressedMemory`).
        form: ``"factorized"`` (static A, B and a small r x r core generated from C: O(d r)
            extra per token; the fast default) or ``"hypernetwork"`` (A(C) and B(C) generated
            from a compressed C, the method as written).
        rank: r, the rank of the modulation (4, 8, 16 are typical). At most the head dimension.
        alpha: scale of the modulation; default ``1 / rank``.
        state_dim: dimension of the meta-state C.
        core: for the factorized form, ``"matrix"`` (a full r x r core) or ``"gate"`` (diagonal).
        hypernetwork_dim: for the hypernetwork form, the size m of the compressed C that the
            bilinear generators read.
        memory_slots: number of learnable vectors in M (their mean is C), or the capacity of
            the addressed bank.
        share_memory: one M for all layers instead of one per layer (consolidated and hybrid).
        hybrid_dynamic: the dynamic source used by ``"hybrid"``.
        addressed_summary: the dynamic source whose output addresses the bank of ``"addressed"``.
        attentive_score_bound: |score| bound of attentive pooling (keeps the running sums of
            its exp-weights in float32 range, so cached decoding is exact).
    """

    source: str = "consolidated"
    form: str = "factorized"
    rank: int = 8
    alpha: float | None = None
    state_dim: int = 64
    core: str = "matrix"
    hypernetwork_dim: int = 8
    memory_slots: int = 4
    share_memory: bool = False
    hybrid_dynamic: str = "mean"
    addressed_summary: str = "mean"
    attentive_score_bound: float = 8.0

    def __post_init__(self) -> None:
        choices = (
            ("source", "meta-state source", SOURCES),
            ("hybrid_dynamic", "hybrid_dynamic source", DYNAMIC_SOURCES),
            ("addressed_summary", "addressed_summary source", DYNAMIC_SOURCES),
            ("form", "modulation form", FORMS),
            ("core", "core", CORES),
        )
        for name, what, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"meta_kv.{name}: unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        for name in ("rank", "state_dim", "hypernetwork_dim", "memory_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"meta_kv.{name} must be an integer >= 1, got {value!r}")
        if not (0 < self.attentive_score_bound <= 40):  # also refuses NaN
            raise ValueError(f"meta_kv.attentive_score_bound must be in (0, 40], got {self.attentive_score_bound}")
        if self.source == "addressed" and self.share_memory:
            raise ValueError("meta_kv.share_memory: the addressed bank is per layer; set share_memory to false "
                             "or use source consolidated or hybrid")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ValueError(f"meta_kv.alpha must be a finite number or null (1 / rank), got {self.alpha}")

    @property
    def scale(self) -> float:
        """alpha, defaulting to 1 / rank."""
        return 1.0 / self.rank if self.alpha is None else self.alpha

    @property
    def dynamic_source(self) -> str | None:
        """The dynamic part of the source, or None for a purely consolidated state."""
        if self.source == "hybrid":
            return self.hybrid_dynamic
        if self.source == "addressed":
            return self.addressed_summary
        return self.source if self.source in DYNAMIC_SOURCES else None

    @property
    def uses_memory(self) -> bool:
        """Whether C includes the consolidated state M."""
        return self.source in ("consolidated", "hybrid")

    @property
    def uses_bank(self) -> bool:
        """Whether C is read from the addressed bank."""
        return self.source == "addressed"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MetaKVConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MetaKVConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MetaKVConfig":
        values = read_json(path, "Meta-KV config")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of MetaKVConfig fields, got {type(values).__name__}")
        return cls.from_dict(values)
