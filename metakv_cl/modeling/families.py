"""The model families metakv-cl supports: one entry per transformers ``config.model_type``.

An entry records what the toolkit needs to know about the family: the attention layout Meta-KV
modulates (:mod:`metakv_cl.modeling.adapters`), whether positions are rotary or a learned table,
the modules LoRA adapts by default, and the shape of a tiny random model for tests
(:func:`metakv_cl.testing.tiny_model`). Adding a family is one entry here: the family tests
(``tests/modeling/test_families.py``) run every entry, and take a test of whatever is new in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from metakv_cl.modeling.adapters import AttentionSite, FusedQKV, NormedK, SeparateKV


@dataclass(frozen=True)
class ModelFamily:
    """What metakv-cl knows about one model type.

    Attributes:
        adapter: where K and V are produced and where their modulation is added.
        rope: rotary positions (no table to overflow); False: a learned position table of
            ``config.max_position_embeddings`` entries, a hard limit.
        lora_targets: module name suffixes LoRA adapts when none are given.
        tiny_config: config arguments of a tiny random model (2 layers, hidden size 64).
        conv1d: its linear layers are GPT-2's Conv1D, weights stored [in, out] (peft's
            ``fan_in_fan_out``).
    """

    adapter: FusedQKV | SeparateKV
    rope: bool
    lora_targets: tuple[str, ...]
    tiny_config: dict[str, Any]
    conv1d: bool = False

    def position_limit(self, config) -> int | None:
        """The number of positions the model can embed; None with RoPE, which has no table (quality
        past the trained context, ``max_position_embeddings``, is the model's)."""
        return None if self.rope else config.max_position_embeddings


_TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256}
_QUERY_AND_VALUE = ("q_proj", "v_proj")

FAMILIES: dict[str, ModelFamily] = {
    "gpt2": ModelFamily(FusedQKV("c_attn"), rope=False, lora_targets=("c_attn",), conv1d=True,
                        tiny_config={"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128}),
    "llama": ModelFamily(SeparateKV(), rope=True, lora_targets=_QUERY_AND_VALUE, tiny_config=_TINY_SHAPE),
    "mistral": ModelFamily(SeparateKV(), rope=True, lora_targets=_QUERY_AND_VALUE, tiny_config=_TINY_SHAPE),
    "qwen2": ModelFamily(SeparateKV(), rope=True, lora_targets=_QUERY_AND_VALUE, tiny_config=_TINY_SHAPE),
    "qwen3": ModelFamily(NormedK(heads_first=False), rope=True, lora_targets=_QUERY_AND_VALUE,
                         tiny_config={**_TINY_SHAPE, "head_dim": 16}),
    # a sliding window shorter than the test sequences, on one layer of two
    "gemma3_text": ModelFamily(NormedK(heads_first=True), rope=True, lora_targets=_QUERY_AND_VALUE,
                               tiny_config={**_TINY_SHAPE, "head_dim": 16, "sliding_window": 4,
                                            "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ModelFamily(FusedQKV("qkv_proj"), rope=True, lora_targets=("qkv_proj",), tiny_config=_TINY_SHAPE),
}


def model_family(model: str | nn.Module | PretrainedConfig) -> ModelFamily:
    """The family of a model, its config, or a model type.

    Raises:
        ValueError: the model type is not registered (the message names the registered ones).
    """
    model_type = model if isinstance(model, str) else getattr(getattr(model, "config", model), "model_type", None)
    if model_type not in FAMILIES:
        what = f"model type {model_type!r}" if model_type else f"{type(model).__name__}: it has no config.model_type"
        raise ValueError(f"unsupported {what}; metakv-cl supports the model types {', '.join(sorted(FAMILIES))} "
                         "(a new one is an entry in metakv_cl/modeling/families.py)")
    return FAMILIES[model_type]


def attention_sites(model: nn.Module) -> tuple[FusedQKV | SeparateKV, list[AttentionSite]]:
    """The adapter of ``model``'s family and its self-attention sites, in layer order.

    Raises:
        ValueError: an unregistered model type, or no attention module of the family's layout.
    """
    adapter = model_family(model).adapter
    sites = [adapter.site(module) for module in model.modules() if adapter.matches(module)]
    if not sites:
        raise ValueError(f"{type(model).__name__} has no attention module of the layout its model type "
                         f"{model.config.model_type!r} is registered with ({type(adapter).__name__})")
    return adapter, sites
