"""Per-batch scoring of causal language models on stream items.

* Language modelling: summed next-token negative log-likelihood and the number of scored tokens
  per sequence (:func:`sequence_nll`); summing both over a test set and dividing gives the
  token-weighted mean loss, which is what reports show (perplexity = exp of it). Only the scored
  positions go through the (vocabulary-wide) softmax, so padding and prompts cost no memory there.
* Classification: every candidate label string is scored by its log-likelihood given the prompt
  (the sum over its tokens, end-of-text included, so a label that is a prefix of another one is
  not favoured), and the best candidate is the prediction (:func:`rank_choices`). The prompt is
  shared by all candidates of an example, so by default it is run once and its KV cache is
  continued with each candidate (:func:`rank_choices_with_shared_prompt`); a dynamic Meta-KV
  meta-state travels with the repeated cache.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from metakv_cl.data.collate import IGNORE_INDEX
from metakv_cl.transformers_api import output_cache, with_cache


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood per sequence.

    Args:
        logits: ``[N, L, V]`` model outputs.
        labels: ``[N, L]`` token ids, ``IGNORE_INDEX`` where no loss is taken. Position ``t``
            is predicted from positions ``< t`` (the usual causal-LM shift is applied here).

    Returns:
        ``(nll_sum, token_count)``, both of shape ``[N]`` (float32 and int64).
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    scored = F.cross_entropy(logits[:, :-1, :][mask].float(), shift_labels[mask], reduction="none")
    nll = torch.zeros(shift_labels.shape, dtype=scored.dtype, device=scored.device).masked_scatter(mask, scored)
    return nll.sum(dim=-1), mask.sum(dim=-1)


def rank_choices(
    forward: Callable[..., Any],
    choice_input_ids: torch.Tensor,
    choice_labels: torch.Tensor,
    choice_attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every candidate label of every example by its log-likelihood, one full row each.

    Args:
        forward: the causal LM (called as ``forward(input_ids=..., attention_mask=...)`` and
            returning an object with ``.logits``).
        choice_input_ids: ``[B, C, L]`` prompt + candidate label tokens.
        choice_labels: ``[B, C, L]`` the candidate tokens, ``IGNORE_INDEX`` elsewhere.
        choice_attention_mask: ``[B, C, L]``.

    Returns:
        ``(log_likelihoods [B, C], predictions [B])``.
    """
    batch, choices, length = choice_input_ids.shape
    outputs = forward(
        input_ids=choice_input_ids.reshape(batch * choices, length),
        attention_mask=choice_attention_mask.reshape(batch * choices, length),
    )
    nll, _ = sequence_nll(outputs.logits, choice_labels.reshape(batch * choices, length))
    log_likelihoods = -nll.view(batch, choices)
    return log_likelihoods, log_likelihoods.argmax(dim=-1)


def rank_choices_with_shared_prompt(
    forward: Callable[..., Any],
    choice_input_ids: torch.Tensor,
    choice_labels: torch.Tensor,
    choice_attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rank_choices`, running each example's prompt once and continuing its KV cache.

    The items are the same ``[B, C, L]`` rows as for :func:`rank_choices` (every row of an
    example holds the same prompt, then its candidate). The prompts run once, right-padded, with
    ``use_cache=True``; the cache is repeated for the C candidates, and the candidates run on it
    with their true positions (prompt length + offset) and a mask that hides the prompt padding.
    This gives the full rows' scores (up to floating-point rounding) at the cost of one prompt
    plus the label tokens, instead of C prompts.

    Args:
        forward: the causal LM; called with ``input_ids``, ``attention_mask`` and ``use_cache``,
            then with the cache (under its transformers name) and ``position_ids``.
        choice_input_ids: ``[B, C, L]`` prompt + candidate label tokens.
        choice_labels: ``[B, C, L]`` the candidate tokens, ``IGNORE_INDEX`` elsewhere.
        choice_attention_mask: ``[B, C, L]``.

    Returns:
        ``(log_likelihoods [B, C], predictions [B])``.

    Raises:
        ValueError: a row without candidate tokens, or the rows of an example disagree on where
            the candidate starts (their prompts differ).
    """
    batch, choices, length = choice_input_ids.shape
    is_label = choice_labels != IGNORE_INDEX
    label_lengths = is_label.sum(dim=-1)  # [B, C]
    if bool((label_lengths == 0).any()):
        raise ValueError("a candidate row has no label tokens to score")
    prompt_lengths_by_row = is_label.float().argmax(dim=-1)  # first candidate position, [B, C]
    prompt_lengths = prompt_lengths_by_row[:, 0]
    if bool((prompt_lengths_by_row != prompt_lengths[:, None]).any()):
        raise ValueError("the candidate rows of an example must share one prompt (same length)")
    if bool((prompt_lengths == 0).any()):
        raise ValueError("a candidate row has an empty prompt")
    device = choice_input_ids.device

    prompt_width = int(prompt_lengths.max())
    prompt_ids = choice_input_ids[:, 0, :prompt_width]
    prompt_mask = (torch.arange(prompt_width, device=device) < prompt_lengths[:, None]).to(choice_attention_mask.dtype)
    prompt_out = forward(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    examples = torch.arange(batch, device=device)
    first_logits = prompt_out.logits[examples, prompt_lengths - 1]  # predicts every candidate's first token

    label_width = int(label_lengths.max())
    offsets = torch.arange(label_width, device=device)
    positions = (prompt_lengths[:, None, None] + offsets).expand(batch, choices, label_width)
    label_mask = offsets < label_lengths[..., None]
    label_ids = choice_input_ids.gather(2, positions.clamp_max(length - 1)).masked_fill(~label_mask, 0)
    cache = output_cache(prompt_out)
    cache.batch_repeat_interleave(choices)
    rows = batch * choices
    continuation = forward(
        input_ids=label_ids.reshape(rows, label_width),
        attention_mask=torch.cat(
            [prompt_mask.repeat_interleave(choices, dim=0), label_mask.reshape(rows, label_width).to(prompt_mask.dtype)],
            dim=1,
        ),
        position_ids=positions.reshape(rows, label_width),
        use_cache=True,
        **with_cache(forward, cache),
    )
    # candidate token j is predicted by the prompt's last position (j = 0) or by candidate token j - 1
    predicting = torch.cat(
        [first_logits.repeat_interleave(choices, dim=0)[:, None], continuation.logits[:, : label_width - 1]], dim=1
    )
    targets = label_ids.reshape(rows, label_width)
    mask = label_mask.reshape(rows, label_width)
    scored = F.cross_entropy(predicting[mask].float(), targets[mask], reduction="none")
    nll = torch.zeros(targets.shape, dtype=scored.dtype, device=device).masked_scatter(mask, scored)
    log_likelihoods = -nll.sum(dim=-1).view(batch, choices)
    return log_likelihoods, log_likelihoods.argmax(dim=-1)
