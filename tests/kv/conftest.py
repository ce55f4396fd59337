"""Fixtures of the compacted-cache tests: the architectures and a real attention block."""

import pytest
import torch

from kv_helpers import BUILDERS, WIKITEXT


@pytest.fixture(params=sorted(BUILDERS))
def architecture(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def real_attention_block():
    """Keys, values and reference queries of one layer of a random GPT-2 run on a real WikiText article.

    A random model with a wide initialisation (so attention is peaked, entropy well below uniform)
    and the real GPT-2 tokenizer; skipped when the offline tokenizer or WikiText is absent.
    """
    if not WIKITEXT.is_file():
        pytest.skip("../shared/data/wikitext2/valid.txt is absent")
    from metakv_cl import hub
    from metakv_cl.kv import CompactedCache, chunked_prefill
    from metakv_cl.kv.evaluate import wikitext_articles
    from transformers import GPT2Config, GPT2LMHeadModel

    try:
        tokenizer = hub.offline_gpt2_tokenizer()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    ids = torch.tensor([tokenizer(wikitext_articles(WIKITEXT)[0])["input_ids"][:256]])
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), initializer_range=0.3)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").eval()
    cache = CompactedCache("attention_matching", 4096, config=model.config, reference_queries=4096)
    chunked_prefill(model, cache, ids, chunk_size=64)
    layer = cache.layers[1]
    return layer.keys, layer.values, layer.reference_queries
