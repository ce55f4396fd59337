"""A FAISS vector store: exact search for small stores, IVF or HNSW for large ones.

The retrieval memories (:mod:`~metakv_cl.kv.retrieval.knn_attention`,
:mod:`~metakv_cl.kv.retrieval.knn_lm`, :mod:`~metakv_cl.kv.retrieval.rag`) keep their keys in a
:class:`Datastore` and their payloads (values, next tokens, chunks) beside it, addressed by the
ids the store hands out: ids count the vectors in the order they were added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import faiss
except ImportError as error:  # an optional extra: the rest of metakv_cl works without it
    raise ImportError(
        "the retrieval memories need FAISS: pip install 'metakv-cl[retrieval]' (or pip install faiss-cpu)"
    ) from error

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE = "index.faiss"
SETTINGS_FILE = "datastore.json"


@dataclass
class SearchResult:
    """Nearest neighbours of a batch of queries.

    Attributes:
        scores: [queries, k] float32: inner products (metric ``ip``, higher is nearer) or squared
            L2 distances (metric ``l2``, lower is nearer), nearest first.
        ids: [queries, k] int64 ids of the neighbours (the order in which they were added).
    """

    scores: torch.Tensor
    ids: torch.Tensor


class Datastore:
    """Vectors in a FAISS index, searched by inner product or L2 distance.

    ``flat`` searches exactly (``IndexFlatIP`` / ``IndexFlatL2``), right for stores of up to
    some 10^5 vectors. ``ivf`` (``IndexIVFFlat``: k-means cells, ``nprobe`` of them searched)
    and ``hnsw`` (``IndexHNSWFlat``: a navigable small-world graph) are approximate and scale
    to millions, the indexes of kNN-LM (Khandelwal et al., "Generalization through
    Memorization: Nearest Neighbor Language Models", ICLR 2020) and Memorizing Transformers
    (Wu et al., ICLR 2022). An IVF index is trained on the first vectors added, so the first
    :meth:`add` must bring at least ``ivf_cells`` of them.

    Args:
        dim: vector dimension.
        metric: ``"ip"`` (inner product) or ``"l2"`` (squared Euclidean distance).
        index: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        ivf_cells: k-means cells of an IVF index.
        ivf_probes: cells an IVF search visits.
        hnsw_neighbors: graph degree of an HNSW index.
        seed: seed of the IVF k-means (every index kind gives the same results on every run).

    Raises:
        ValueError: a dimension below 1, an unknown metric or index kind, or a bad IVF/HNSW size.
    """

    def __init__(self, dim: int, *, metric: str = "ip", index: str = "flat", ivf_cells: int = 64, ivf_probes: int = 8,
                 hnsw_neighbors: int = 32, seed: int = 0):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if index not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {index!r}; choose one of {', '.join(INDEX_KINDS)}")
        for name, value in (("ivf_cells", ivf_cells), ("ivf_probes", ivf_probes), ("hnsw_neighbors", hnsw_neighbors)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.dim, self.metric, self.kind = dim, metric, index
        self.ivf_cells, self.ivf_probes, self.hnsw_neighbors, self.seed = ivf_cells, ivf_probes, hnsw_neighbors, seed
        self.index = self._new_index()

    def _new_index(self):
        description = {"flat": "Flat", "ivf": f"IVF{self.ivf_cells},Flat", "hnsw": f"HNSW{self.hnsw_neighbors}"}[self.kind]
        index = faiss.index_factory(self.dim, description, METRICS[self.metric])
        if self.kind == "ivf":
            index.cp.seed = self.seed
            index.nprobe = self.ivf_probes
        return index

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored vectors (float32), the memory a store of this size needs at least."""
        return len(self) * self.dim * 4

    def _as_matrix(self, vectors, what: str) -> np.ndarray:
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().to("cpu", torch.float32).numpy()
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"{what} must be [n, {self.dim}] (the datastore's dimension), got {tuple(matrix.shape)}")
        return matrix

    def add(self, vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Add vectors; returns their ids [n] (int64).

        Raises:
            ValueError: vectors not [n, dim], or a first IVF batch smaller than ``ivf_cells``.
        """
        matrix = self._as_matrix(vectors, "vectors")
        first_id = len(self)
        if not self.index.is_trained:
            if matrix.shape[0] < self.ivf_cells:
                raise ValueError(
                    f"an IVF datastore trains on its first batch, which needs at least ivf_cells={self.ivf_cells} "
                    f"vectors, got {matrix.shape[0]}: add more at once, lower ivf_cells, or use index='flat'"
                )
            self.index.train(matrix)
        self.index.add(matrix)
        return torch.arange(first_id, len(self), dtype=torch.int64)

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> SearchResult:
        """The ``min(k, len(self))`` nearest stored vectors of each query.

        Args:
            queries: [n, dim].
            k: neighbours per query.

        Returns:
            :class:`SearchResult`, nearest first.

        Raises:
            ValueError: k below 1, queries not [n, dim], or an empty datastore.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if len(self) == 0:
            raise ValueError("cannot search an empty datastore: add vectors first")
        matrix = self._as_matrix(queries, "queries")
        k = min(k, len(self))
        scores, ids = self.index.search(matrix, k)
        if (ids < 0).any():
            scores, ids = self._search_everywhere(matrix, k)
        return SearchResult(torch.from_numpy(scores), torch.from_numpy(ids))

    def _search_everywhere(self, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search again visiting every IVF cell (or a wider HNSW beam): the probed cells held fewer than k vectors.

        FAISS marks missing neighbours with id -1, which every caller would read as a real id.
        """
        if self.kind == "ivf":
            self.index.nprobe = self.index.nlist
            try:
                scores, ids = self.index.search(matrix, k)
            finally:
                self.index.nprobe = self.ivf_probes
        else:
            beam = self.index.hnsw.efSearch
            self.index.hnsw.efSearch = max(beam, len(self))
            try:
                scores, ids = self.index.search(matrix, k)
            finally:
                self.index.hnsw.efSearch = beam
        if (ids < 0).any():
            raise RuntimeError(f"the {self.kind} index found fewer than {k} of its {len(self)} vectors for a query")
        return scores, ids

    def save(self, directory: str | Path) -> Path:
        """Write the index and its settings to ``directory`` (created); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        (directory / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=2))
        return directory

    def settings(self) -> dict[str, Any]:
        """The constructor arguments of this store (plain values)."""
        return {"dim": self.dim, "metric": self.metric, "index": self.kind, "ivf_cells": self.ivf_cells,
                "ivf_probes": self.ivf_probes, "hnsw_neighbors": self.hnsw_neighbors, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """The settings and the serialised index as a uint8 tensor (what a stream state file holds)."""
        return {"settings": self.settings(), "index": torch.from_numpy(faiss.serialize_index(self.index))}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Datastore:
        """Rebuild a store from :meth:`state_dict` output."""
        store = cls(**state["settings"])
        store._set_index(faiss.deserialize_index(state["index"].numpy()))
        return store

    def _set_index(self, index) -> None:
        # a read index forgets the search-time setting nprobe
        self.index = index
        if self.kind == "ivf":
            self.index.nprobe = self.ivf_probes

    @classmethod
    def load(cls, directory: str | Path) -> Datastore:
        """Read a datastore written by :meth:`save`.

        Raises:
            FileNotFoundError: ``directory`` lacks the index or its settings.
        """
        directory = Path(directory)
        for name in (INDEX_FILE, SETTINGS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: not a directory written by Datastore.save")
        store = cls(**json.loads((directory / SETTINGS_FILE).read_text()))
        store._set_index(faiss.read_index(str(directory / INDEX_FILE)))
        return store
