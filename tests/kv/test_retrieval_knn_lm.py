"""kNN-LM (Khandelwal et al. 2020): interpolation, retrieval of stored contexts, generate() and perplexity."""

import pytest
import torch
from transformers import LogitsProcessorList

pytest.importorskip("faiss", reason="faiss-cpu is not installed (the 'retrieval' extra)")

from kv_helpers import build, token_ids  # noqa: E402
from metakv_cl.testing import tiny_gpt2  # noqa: E402
from metakv_cl.kv import CompactedCache, stream_log_likelihood  # noqa: E402
from metakv_cl.kv.retrieval.datastore import Datastore  # noqa: E402
from metakv_cl.kv.retrieval.knn_lm import KNNLM, FinalHiddenStates, knn_lm_log_likelihood  # noqa: E402

GREEDY = {"do_sample": False, "pad_token_id": 0}


def corpus_knn_lm(architecture: str, **settings):
    model = build(architecture)
    corpus = token_ids(1, 40, seed=5)[0]
    return model, corpus, KNNLM.from_corpus(model, [corpus], window=16, **settings)


def test_the_store_holds_every_context_of_the_corpus(architecture):
    _, corpus, knn_lm = corpus_knn_lm(architecture)
    assert len(knn_lm.datastore) == 39 and torch.equal(knn_lm.next_tokens, corpus[1:])


@pytest.mark.parametrize("position", [3, 15, 16, 30])
def test_a_stored_context_retrieves_its_next_token(architecture, position):
    model, corpus, knn_lm = corpus_knn_lm(architecture, k=4, temperature=0.1)
    window_start = (position - 1) // 15 * 15  # the window the corpus context was stored from
    with FinalHiddenStates(model) as captured, torch.no_grad():
        model(input_ids=corpus[window_start:position].unsqueeze(0))
    knn = knn_lm.knn_log_probs(captured.latest[:, -1], model.config.vocab_size).exp()
    assert int(knn.argmax()) == int(corpus[position]) and float(knn.max()) > 0.99


def test_lambda_zero_is_the_language_model(architecture):
    model, corpus, knn_lm = corpus_knn_lm(architecture, interpolation=0.0)
    text = token_ids(1, 30, seed=9)
    nll, count = knn_lm_log_likelihood(model, knn_lm, text, chunk_size=7, score_from=4)
    reference, reference_count, _ = stream_log_likelihood(model, CompactedCache("full", config=model.config), text, score_from=4)
    assert count == reference_count == 26
    assert nll == pytest.approx(reference, abs=1e-4)


def test_the_mixture_is_lambda_weighted():
    model, corpus, knn_lm = corpus_knn_lm("gpt2", interpolation=0.3)
    hidden, logits = torch.randn(5, 64), torch.randn(5, model.config.vocab_size)
    expected = 0.3 * knn_lm.knn_log_probs(hidden, logits.shape[-1]).exp() + 0.7 * torch.softmax(logits, dim=-1)
    mixed = knn_lm.log_probs(hidden, logits).exp()
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=1e-5)
    assert torch.allclose(mixed.sum(-1), torch.ones(5))


def test_memorised_text_scores_better_than_the_model_alone(architecture):
    model, corpus, knn_lm = corpus_knn_lm(architecture, interpolation=0.5, temperature=0.1)
    with_memory, _ = knn_lm_log_likelihood(model, knn_lm, corpus[:16].unsqueeze(0))
    knn_lm.interpolation = 0.0
    without, _ = knn_lm_log_likelihood(model, knn_lm, corpus[:16].unsqueeze(0))
    assert with_memory < without - 5


def test_generate_with_full_weight_on_memory_recites_the_corpus(architecture):
    model, corpus, knn_lm = corpus_knn_lm(architecture, interpolation=1.0, k=1)
    with knn_lm.logits_processor(model) as processor:
        output = model.generate(corpus[:6].unsqueeze(0), max_new_tokens=8, logits_processor=LogitsProcessorList([processor]), **GREEDY)
    assert torch.equal(output[0, 6:], corpus[6:14])


def test_generate_at_lambda_zero_is_stock_generation(architecture):
    model, corpus, knn_lm = corpus_knn_lm(architecture, interpolation=0.0)
    prompt = token_ids(2, 5, seed=2)
    stock = model.generate(prompt, max_new_tokens=6, **GREEDY)
    with knn_lm.logits_processor(model) as processor:
        mixed = model.generate(prompt, max_new_tokens=6, logits_processor=LogitsProcessorList([processor]), **GREEDY)
    assert torch.equal(mixed, stock)


def test_save_load_round_trip(tmp_path):
    model, corpus, knn_lm = corpus_knn_lm("llama", interpolation=0.4, temperature=2.0, k=3)
    loaded = KNNLM.load(knn_lm.save(tmp_path / "knn_lm"))
    assert (loaded.interpolation, loaded.temperature, loaded.k) == (0.4, 2.0, 3)
    hidden, logits = torch.randn(4, 64), torch.randn(4, model.config.vocab_size)
    assert torch.equal(loaded.log_probs(hidden, logits), knn_lm.log_probs(hidden, logits))
    assert knn_lm.nbytes == 39 * 64 * 4 + 39 * 8


def test_bad_settings_raise(tmp_path):
    store = Datastore(4, metric="l2")
    store.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match="by L2 distance; the datastore uses metric 'ip'"):
        KNNLM(Datastore(4), torch.zeros(0))
    with pytest.raises(ValueError, match=r"next_tokens must be \[3\].*got \(2,\)"):
        KNNLM(store, torch.zeros(2))
    with pytest.raises(ValueError, match=r"interpolation \(lambda\) must be in \[0, 1\], got 1.5"):
        KNNLM(store, torch.zeros(3), interpolation=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        KNNLM(store, torch.zeros(3), temperature=0)
    with pytest.raises(ValueError, match="hidden states must be|queries must be"):
        KNNLM(store, torch.zeros(3)).log_probs(torch.randn(2, 5), torch.randn(2, 10))
    model = build("gpt2")
    with pytest.raises(ValueError, match="at least one sequence of two or more tokens"):
        KNNLM.from_corpus(model, [torch.tensor([1])])
    with pytest.raises(FileNotFoundError, match="next_tokens.safetensors is missing"):
        KNNLM.load(tmp_path)


def test_a_new_experience_adds_to_the_store_without_forgetting_the_first():
    model, corpus, knn_lm = corpus_knn_lm("llama", k=1)
    second = token_ids(1, 30, seed=6)[0]
    assert knn_lm.add_corpus(model, [second], window=16) == 29
    assert len(knn_lm.datastore) == knn_lm.next_tokens.shape[0] == 68
    for sequence, position in ((corpus, 10), (second, 10)):
        with FinalHiddenStates(model) as captured, torch.no_grad():
            model(input_ids=sequence[:position].unsqueeze(0))
        knn = knn_lm.knn_log_probs(captured.latest[:, -1], model.config.vocab_size).exp()
        assert int(knn.argmax()) == int(sequence[position])
    with pytest.raises(ValueError, match=r"vectors must be \[n, 64\] \(the datastore's dimension\), got \(29, 32\)"):
        knn_lm.add_corpus(tiny_gpt2(n_embd=32), [second], window=16)
