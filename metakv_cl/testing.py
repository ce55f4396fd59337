"""Tiny randomly initialised models for tests, examples and smoke runs (no download needed)."""

import metakv_cl  # noqa: F401  (the torchvision import fix must run before transformers' models)
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from metakv_cl.modeling import meta_kv_parameters

VOCAB = 97


def tiny_gpt2(attn_implementation: str = "sdpa", **overrides) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation).eval()


def tiny_llama(attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


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
