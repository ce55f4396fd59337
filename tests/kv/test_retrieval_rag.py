"""Retrieval-augmented inputs (RAG): chunking, the LM's mean-pooled chunk embeddings, retrieval, the evaluation mode."""

import pytest
import torch

pytest.importorskip("faiss", reason="faiss-cpu is not installed (the 'retrieval' extra)")

from kv_helpers import build, token_ids  # noqa: E402
from metakv_cl.kv.retrieval.rag import (  # noqa: E402
    ChunkRetriever,
    ExampleStore,
    MeanPooledEmbedder,
    chunk_tokens,
    rag_log_likelihood,
)


def test_chunks_cover_the_ids_in_order():
    chunks = chunk_tokens(torch.arange(10), 4)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        chunk_tokens(torch.arange(3), 0)
    with pytest.raises(ValueError, match=r"ids must be 1-D token ids, got shape \(1, 3\)"):
        chunk_tokens(torch.arange(3)[None], 2)


def test_mean_pooled_embeddings_ignore_padding(architecture):
    embed = MeanPooledEmbedder(build(architecture))
    short, long = token_ids(1, 5)[0], token_ids(1, 12, seed=1)[0]
    together = embed([short, long])
    torch.testing.assert_close(together[0], embed([short])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(2))


def test_a_stored_chunk_retrieves_itself_and_lands_next_to_the_input(architecture):
    retriever = ChunkRetriever(MeanPooledEmbedder(build(architecture)), chunk_size=8, top_k=2)
    documents = [token_ids(1, 40, seed=s)[0] for s in range(3)]
    retriever.add_documents(documents)
    assert len(retriever) == 15 and retriever.nbytes == 15 * 8 * 8 + 15 * 64 * 4
    query = documents[1][16:24]
    assert torch.equal(retriever.retrieve(query)[0], query)
    augmented = retriever.augment(query)
    assert augmented.shape == (24,) and torch.equal(augmented[8:16], query) and torch.equal(augmented[16:], query)


def test_each_stride_reads_its_retrieved_chunks_then_the_local_tokens():
    model = build("llama")
    text = token_ids(1, 50, seed=3)[0]
    retriever = ChunkRetriever(MeanPooledEmbedder(model), chunk_size=8, top_k=2)
    nll, count = rag_log_likelihood(model, text, retriever, local_tokens=6, stride=5, score_from=40)
    assert count == 10 and len(retriever) == 4  # chunks of tokens [0, 32): the last stride's local tokens start at 39
    # The first stride by hand: the chunks before token 34 (the local tokens are 34..39), retrieved for those.
    reference = ChunkRetriever(MeanPooledEmbedder(model), chunk_size=8, top_k=2)
    reference.add_chunks(chunk_tokens(text[:32], 8))
    context = torch.cat([reference.augment(text[34:40]), text[40:45]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=context[None]).logits[0, -6:-1], dim=-1)
    first = -float(log_probs.gather(-1, text[40:45, None]).sum())
    second, _ = rag_log_likelihood(model, text[:45], ChunkRetriever(MeanPooledEmbedder(model), chunk_size=8, top_k=2),
                                   local_tokens=6, stride=5, score_from=40)
    assert second == pytest.approx(first, abs=1e-4)


def test_bad_settings_raise():
    model = build("gpt2")
    with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):
        ChunkRetriever(MeanPooledEmbedder(model), top_k=0)
    retriever = ChunkRetriever(MeanPooledEmbedder(model), chunk_size=4)
    with pytest.raises(ValueError, match="empty ChunkRetriever"):
        retriever.retrieve(torch.arange(1, 4))
    with pytest.raises(ValueError, match=r"score_from must be in \[local_tokens=8, 19\], got 4"):
        rag_log_likelihood(model, token_ids(1, 20), retriever, local_tokens=8, stride=4, score_from=4)


def test_an_example_store_searches_by_prompt_and_returns_whole_examples():
    def embed(sequences):  # one-hot of the first token: a prompt's key is its first token alone
        return torch.nn.functional.one_hot(torch.stack([s[0] for s in sequences]), 8).float()

    store = ExampleStore(8)
    store.add([torch.tensor([1, 2, 7]), torch.tensor([3, 4, 5, 6])], [2, 2], embed)
    assert len(store) == 2 and store.nbytes == 2 * 8 * 4 + 7 * 8 + 2 * 8 + 2 * 8
    assert [[e.tolist() for e in found] for found in store.search(embed([torch.tensor([3]), torch.tensor([1])]), 1)] \
        == [[[3, 4, 5, 6]], [[1, 2, 7]]]
    assert store.search(embed([torch.tensor([3])]), 0) == [[]]
    keys = []
    store.reembed(lambda sequences: keys.extend(sequences) or embed(sequences))
    assert [k.tolist() for k in keys] == [[1, 2], [3, 4]]  # the prompts, never the answers
    restored = ExampleStore.from_state_dict(store.state_dict())
    assert [e.tolist() for e in restored.examples()] == [[1, 2, 7], [3, 4, 5, 6]]
    assert restored.search(embed([torch.tensor([1])]), 2)[0][0].tolist() == [1, 2, 7]
    with pytest.raises(ValueError, match=r"a prompt length must be in \[1, 3\] \(its example's length\), got 4"):
        store.add([torch.tensor([1, 2, 3])], [4], embed)
