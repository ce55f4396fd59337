"""The FAISS datastore of the retrieval memories: exact and approximate search, save/load, errors, determinism."""

import pytest
import torch

pytest.importorskip("faiss", reason="faiss-cpu is not installed (the 'retrieval' extra)")

from metakv_cl.kv.retrieval.datastore import Datastore  # noqa: E402


def vectors(count: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_is_exact(metric):
    data, queries = vectors(300), vectors(20, seed=1)
    store = Datastore(16, metric=metric)
    assert torch.equal(store.add(data), torch.arange(300))
    result = store.search(queries, 5)
    reference = queries @ data.T if metric == "ip" else -torch.cdist(queries, data) ** 2
    assert torch.equal(result.ids, reference.topk(5, dim=-1).indices)
    expected = reference.topk(5, dim=-1).values
    assert torch.allclose(result.scores, expected if metric == "ip" else -expected, atol=1e-4)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_find_stored_vectors(index):
    data = vectors(1024)
    store = Datastore(16, metric="l2", index=index, ivf_cells=8, ivf_probes=8)
    store.add(data)
    assert torch.equal(store.search(data[:50], 1).ids[:, 0], torch.arange(50))


@pytest.mark.parametrize("through", ["files", "state_dict"])
@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, index, through):
    data, queries = vectors(512), vectors(30, seed=1)
    store = Datastore(16, index=index, ivf_cells=8, ivf_probes=2, seed=3)
    store.add(data)
    if through == "files":
        loaded = Datastore.load(store.save(tmp_path / "store"))
    else:  # what a stream state file holds: a uint8 tensor and plain values
        loaded = Datastore.from_state_dict(store.state_dict())
    if index == "ivf":
        assert loaded.index.nprobe == 2  # a search-time setting the serialised index forgets
    assert (len(loaded), loaded.kind, loaded.metric, loaded.ivf_probes) == (512, index, "ip", 2)
    before, after = store.search(queries, 7), loaded.search(queries, 7)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_a_fixed_seed_gives_the_same_neighbours(index):
    data, queries = vectors(1024), vectors(40, seed=1)
    results = []
    for _ in range(2):
        store = Datastore(16, index=index, ivf_cells=16, ivf_probes=2, seed=7)
        store.add(data)
        results.append(store.search(queries, 5).ids)
    assert torch.equal(results[0], results[1])


def test_k_beyond_the_store_returns_every_vector():
    store = Datastore(4)
    store.add(vectors(3, dim=4))
    assert store.search(vectors(2, dim=4), 10).ids.shape == (2, 3)


def test_errors_name_the_problem(tmp_path):
    store = Datastore(8)
    with pytest.raises(ValueError, match="empty datastore"):
        store.search(vectors(1, dim=8), 1)
    with pytest.raises(ValueError, match=r"vectors must be \[n, 8\].*got \(5, 6\)"):
        store.add(vectors(5, dim=6))
    store.add(vectors(5, dim=8))
    with pytest.raises(ValueError, match=r"queries must be \[n, 8\].*got \(2, 9\)"):
        store.search(vectors(2, dim=9), 1)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        store.search(vectors(1, dim=8), 0)
    with pytest.raises(ValueError, match="ivf_cells=64 vectors, got 10"):
        Datastore(8, index="ivf").add(vectors(10, dim=8))
    with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
        Datastore(8, index="annoy")
    with pytest.raises(ValueError, match="unknown metric 'cosine'"):
        Datastore(8, metric="cosine")
    with pytest.raises(ValueError, match="dim must be a positive integer, got 0"):
        Datastore(0)
    with pytest.raises(FileNotFoundError, match="index.faiss is missing"):
        Datastore.load(tmp_path)


def test_an_ivf_probe_with_too_few_vectors_still_returns_k_real_neighbours():
    """FAISS fills missing neighbours with id -1 when the probed cells hold fewer than k vectors."""
    vectors = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    store = Datastore(8, index="ivf", ivf_cells=16, ivf_probes=1)
    store.add(vectors)
    result = store.search(vectors[:5], k=10)
    exact = Datastore(8)
    exact.add(vectors)
    assert (result.ids >= 0).all()
    assert torch.equal(result.ids, exact.search(vectors[:5], k=10).ids)
