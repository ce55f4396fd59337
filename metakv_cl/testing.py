"""Tiny randomly initialised models for tests, examples and smoke runs (no download needed)."""

from functools import partial

import metakv_cl  # noqa: F401  (the torchvision import fix must run before transformers' models)
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from metakv_cl.modeling import meta_kv_parameters
from metakv_cl.transformers_api import with_cache
from metakv_cl.modeling.families import model_family

VOCAB = 97


def tiny_model(model_type: str, attn_implementation: str = "sdpa", **overrides) -> PreTrainedModel:
    """A tiny randomly initialised causal LM of a registered family, in eval mode.

    Args:
        model_type: a registered ``config.model_type`` (``"gpt2"``, ``"llama"``, ...).
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        overrides: config arguments replacing the family's tiny shape (``vocab_size``, ...).

    Returns:
        The model, with its family's ``tiny_config``, a vocabulary of ``VOCAB`` tokens and token 0
        as BOS, EOS and padding.
    """
    arguments = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    config = AutoConfig.for_model(model_type, **{**arguments, **model_family(model_type).tiny_config, **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


tiny_gpt2 = partial(tiny_model, "gpt2")
tiny_llama = partial(tiny_model, "llama")


def randomize_meta_kv(model, std: float = 0.3, seed: int = 1) -> None:
    """Give every Meta-KV parameter a random value, so the modulation is far from zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in meta_kv_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def left_padded_batch(batch: int = 3, length: int = 12, seed: int = 0):
    """Random ids, a mask with 0, 2, 4, ... left pads per row, and the matching position ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0  # rows get 0, 2, 4, ... left pads
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


def stepwise_logits(model, ids, mask, positions, prefill: int):
    """Prefill ``prefill`` tokens, then decode the rest one token at a time with a cache.

    Returns:
        The logits of every token [batch, time, vocab], to compare with one full forward.
    """
    cache = DynamicCache(config=model.config)
    chunks = [
        model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill],
              **with_cache(model, cache), use_cache=True).logits
    ]
    for t in range(prefill, ids.shape[1]):
        chunks.append(
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                  **with_cache(model, cache), use_cache=True).logits
        )
    return torch.cat(chunks, dim=1)
