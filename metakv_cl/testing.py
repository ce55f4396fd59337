"""Tiny randomly initialised models for tests, examples and smoke runs (no download needed)."""

import metakv_cl  # noqa: F401  (the torchvision import fix must run before transformers' models)
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

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
