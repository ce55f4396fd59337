"""SnapKV: keep the tokens the last prompt tokens attend to, pooled, plus that observation window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from metakv_cl.kv.protocol import MASKED_BIAS, TokenSelector, float32_math, recent_indices
from metakv_cl.kv.registry import register_method


@register_method("snapkv")
@dataclass
class SnapKV(TokenSelector):
    """Score each token by the attention the observation window (the last ``window`` tokens) gives it.

    Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows What You Are
    Looking for Before Generation" (NeurIPS 2024). The window's queries (all query heads of a KV
    head) attend causally to the cache; a token's score is the mean attention it receives,
    smoothed over neighbouring tokens by average pooling (so kept tokens come with some
    context); the top scorers before the window are kept with the window itself. This is the
    question-agnostic form: the window is the end of the context read so far, not a question.

    Needs the queries of the most recent tokens (the cache keeps them: ``query_sampling`` is
    ``"recent"``); with fewer captured than the window, the window shrinks to them.

    Args:
        window: observation window, in tokens (kept in full; at most the kept count).
        kernel_size: width of the average pooling over tokens (odd; 1: no pooling).
    """

    window: int = 32
    kernel_size: int = 7
    needs_queries: ClassVar[bool] = True
    query_sampling: ClassVar[str] = "recent"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")

    def token_scores(self, keys: torch.Tensor, queries: torch.Tensor, bias: torch.Tensor | None,
                     query_groups: int) -> torch.Tensor:
        """Pooled attention of the observation window on every entry [batch, kv_heads, tokens] (window entries included)."""
        tokens = keys.shape[-2]
        window = min(self.window, queries.shape[-2] // query_groups, tokens)
        observed = queries[:, :, -window * query_groups :]
        with float32_math(keys.device):
            scores = observed.float() @ keys.float().transpose(-1, -2)  # [b, h, window * groups, tokens]
            if bias is not None:
                scores = scores + bias.float().unsqueeze(-2)
            # Window token i (rows i * groups ... ) sees the entries up to its own position, tokens - window + i.
            row_token = torch.arange(window * query_groups, device=keys.device) // query_groups + tokens - window
            future = torch.arange(tokens, device=keys.device) > row_token.unsqueeze(-1)
            attention = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).mean(dim=2)
            if self.kernel_size > 1:
                flat = attention.reshape(-1, 1, tokens)
                attention = torch.nn.functional.avg_pool1d(flat, self.kernel_size, stride=1, padding=self.kernel_size // 2,
                                                           count_include_pad=False).reshape(attention.shape)
        return attention

    def select(self, keys, values, queries, count, *, bias, importance, query_groups):
        if queries is None or queries.shape[-2] == 0:
            raise ValueError(
                f"{type(self).__name__} needs the queries of the last tokens: run the model with a CompactedCache "
                "after enable_compacted_attention(model), or pass queries [batch, kv_heads, n, head_dim]"
            )
        tokens = keys.shape[-2]
        recent = min(self.window, count)
        window = recent_indices(tokens, recent, keys)
        if recent == count:
            return window
        scores = self.token_scores(keys, queries, bias, query_groups)
        if bias is not None:
            scores = scores.masked_fill(bias <= MASKED_BIAS / 2, -1.0)
        scores[..., tokens - recent :] = float("-inf")  # already kept by the window
        return torch.cat([scores.topk(count - recent, dim=-1).indices, window], dim=-1)
