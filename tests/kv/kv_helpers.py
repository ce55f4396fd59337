"""Helpers shared by the compacted-cache tests (a plain module: tests/ has no packages)."""

from pathlib import Path

import torch

from metakv_cl.kv import available_methods
from metakv_cl.modeling import MetaKVConfig, add_meta_kv
from metakv_cl.testing import VOCAB, randomize_meta_kv, tiny_gpt2, tiny_llama

DATA_ROOT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
WIKITEXT = DATA_ROOT / "wikitext2" / "valid.txt"
METHODS = available_methods()
TOKEN_METHODS = [m for m in METHODS if m != "full"]
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random ids that avoid the pad/eos id 0 of the tiny models."""
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def build(architecture: str, attn_implementation: str = "sdpa"):
    """A tiny randomly initialised model of ``architecture`` (``gpt2`` or ``llama``), seeded."""
    torch.manual_seed(0)
    return BUILDERS[architecture](attn_implementation)


def with_meta_kv(model):
    """Add a randomised (so far from the identity) dynamic Meta-KV to the model."""
    add_meta_kv(model, MetaKVConfig(source="mean", rank=4, state_dim=16))
    randomize_meta_kv(model)
    return model
