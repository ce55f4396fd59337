"""Per-batch scoring of causal language models on stream items.

* Language modelling: summed next-token negative log-likelihood and the number of scored tokens
  per sequence (:func:`sequence_nll`); summing both over a test set and dividing gives the
  token-weighted mean loss, which is what reports show (perplexity = exp of it).
* Classification: every candidate label string is scored by its log-likelihood given the prompt
  (the sum over its tokens, end-of-text included, so a label that is a prefix of another one is
  not favoured), and the best candidate is the prediction (:func:`rank_choices`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from metakv_cl.data.collate import IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood per sequence.

    Args:
        logits: ``[N, L, V]`` model outputs.
        labels: ``[N, L]`` token ids, ``IGNORE_INDEX`` where no loss is taken. Position ``t``
            is predicted from positions ``< t`` (the usual causal-LM shift is applied here).

    Returns:
        ``(nll_sum, token_count)``, both of shape ``[N]`` (float32 and int64).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.clamp_min(0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    return (nll * mask).sum(dim=-1), mask.sum(dim=-1)


def rank_choices(
    forward: Callable[..., Any],
    choice_input_ids: torch.Tensor,
    choice_labels: torch.Tensor,
    choice_attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every candidate label of every example by its log-likelihood.

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
