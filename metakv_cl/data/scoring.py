"""Per-batch scoring of causal language models on stream items.

* Language modelling: summed next-token negative log-likelihood and the number of scored tokens
  per sequence (:func:`sequence_nll`); summing both over a test set and dividing gives the
  token-weighted mean loss, which is what reports show (perplexity = exp of it). Only the scored
  positions go through the (vocabulary-wide) softmax, so padding and prompts cost no memory there.
* Classification: every candidate label string is scored by its log-likelihood given the prompt
  (the sum over its tokens, end-of-text included, so a label that is a prefix of another one is
  not favoured), and the best candidate is the prediction (:func:`rank_choices`). ``ranking``
  picks what "best" means: ``"sum"`` the highest summed log-likelihood, ``"mean"`` the highest
  mean per label token (length-normalised: a long label is not penalised for its length). The
  prompt is shared by all candidates of an example, so by default it is run once and its KV cache
  is continued with each candidate (:func:`rank_choices_with_shared_prompt`); a dynamic Meta-KV
  meta-state travels with the repeated cache.
* Generative exact match (the metric of the O-LoRA line of work): the prompt is greedily
  continued (:func:`greedy_decode`) and the item is right when the decoded tokens are the gold
  label's tokens (:func:`generated_exact_match`). Decoding stops once every item's verdict is
  settled (it has left its gold label or decoded all of it). Beside the shared-prompt ranking no
  decoding runs at all (:func:`rank_choices_and_exact_match`): greedy decoding reproduces the
  gold label exactly when, at every gold position, the most likely next token given the gold
  prefix is the gold token, and the gold candidate's pass already computed those logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from metakv_cl.data.collate import IGNORE_INDEX
from metakv_cl.transformers_api import output_cache, with_cache

# how candidates are ranked: by summed or by mean (per label token) log-likelihood
RANKINGS = ("sum", "mean")


def check_ranking(ranking: str) -> None:
    """Raise ``ValueError`` unless ``ranking`` is one of :data:`RANKINGS`."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")


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


def best_choices(log_likelihoods: torch.Tensor, label_lengths: torch.Tensor, ranking: str = "sum") -> torch.Tensor:
    """The prediction of each example: its best candidate under ``ranking``.

    Args:
        log_likelihoods: ``[B, C]`` summed log-likelihood of each candidate.
        label_lengths: ``[B, C]`` number of tokens of each candidate.
        ranking: ``"sum"`` (highest summed log-likelihood) or ``"mean"`` (highest mean per token).

    Returns:
        ``[B]`` index of the best candidate.

    Raises:
        ValueError: an unknown ``ranking``.
    """
    check_ranking(ranking)
    scores = log_likelihoods / label_lengths if ranking == "mean" else log_likelihoods
    return scores.argmax(dim=-1)


def rank_choices(
    forward: Callable[..., Any],
    choice_input_ids: torch.Tensor,
    choice_labels: torch.Tensor,
    choice_attention_mask: torch.Tensor,
    ranking: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every candidate label of every example by its log-likelihood, one full row each.

    Args:
        forward: the causal LM (called as ``forward(input_ids=..., attention_mask=...)`` and
            returning an object with ``.logits``).
        choice_input_ids: ``[B, C, L]`` prompt + candidate label tokens.
        choice_labels: ``[B, C, L]`` the candidate tokens, ``IGNORE_INDEX`` elsewhere.
        choice_attention_mask: ``[B, C, L]``.
        ranking: how the prediction is chosen (:func:`best_choices`).

    Returns:
        ``(log_likelihoods [B, C], predictions [B])``; the log-likelihoods are summed over the
        label tokens whatever the ranking.
    """
    batch, choices, length = choice_input_ids.shape
    outputs = forward(
        input_ids=choice_input_ids.reshape(batch * choices, length),
        attention_mask=choice_attention_mask.reshape(batch * choices, length),
    )
    nll, counts = sequence_nll(outputs.logits, choice_labels.reshape(batch * choices, length))
    log_likelihoods = -nll.view(batch, choices)
    return log_likelihoods, best_choices(log_likelihoods, counts.view(batch, choices), ranking)


def shared_prompts(
    choice_input_ids: torch.Tensor, choice_labels: torch.Tensor, choice_attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each example's prompt, taken once from its candidate rows, right-padded.

    Args:
        choice_input_ids: ``[B, C, L]`` prompt + candidate label tokens.
        choice_labels: ``[B, C, L]`` the candidate tokens, ``IGNORE_INDEX`` elsewhere.
        choice_attention_mask: ``[B, C, L]`` (its dtype is the prompt mask's).

    Returns:
        ``(prompt_ids [B, P], prompt_mask [B, P], prompt_lengths [B], label_lengths [B, C])``,
        ``P`` the longest prompt.

    Raises:
        ValueError: a row without candidate tokens, an empty prompt, or the rows of an example
            disagree on where the candidate starts (their prompts differ).
    """
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
    prompt_width = int(prompt_lengths.max())
    prompt_ids = choice_input_ids[:, 0, :prompt_width]
    positions = torch.arange(prompt_width, device=choice_input_ids.device)
    prompt_mask = (positions < prompt_lengths[:, None]).to(choice_attention_mask.dtype)
    return prompt_ids, prompt_mask, prompt_lengths, label_lengths


@dataclass
class PromptPass:
    """One run of right-padded prompts through the model, for candidates or decoding to continue.

    Attributes:
        cache: the model's KV cache after the prompts (Meta-KV state included).
        last_logits: ``[B, V]`` logits at each prompt's last token: they predict the first
            continuation token.
        mask: ``[B, P]`` 1 on prompt tokens, 0 on padding.
        lengths: ``[B]`` prompt lengths.
    """

    cache: Any
    last_logits: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def run_prompts(forward: Callable[..., Any], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptPass:
    """Run right-padded prompts once with ``use_cache=True``.

    Args:
        forward: the causal LM, called with ``input_ids``, ``attention_mask`` and ``use_cache``.
        prompt_ids: ``[B, P]`` prompts, right-padded.
        prompt_mask: ``[B, P]`` 1 on prompt tokens, 0 on padding.

    Returns:
        The :class:`PromptPass`.
    """
    prompt_lengths = prompt_mask.sum(dim=-1)
    outputs = forward(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    last_logits = outputs.logits[torch.arange(prompt_ids.shape[0], device=prompt_ids.device), prompt_lengths - 1]
    return PromptPass(output_cache(outputs), last_logits, prompt_mask, prompt_lengths)


def rank_choices_with_shared_prompt(
    forward: Callable[..., Any],
    choice_input_ids: torch.Tensor,
    choice_labels: torch.Tensor,
    choice_attention_mask: torch.Tensor,
    ranking: str = "sum",
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
        ranking: how the prediction is chosen (:func:`best_choices`).

    Returns:
        ``(log_likelihoods [B, C], predictions [B])``, as :func:`rank_choices`.

    Raises:
        ValueError: see :func:`shared_prompts`.
    """
    log_likelihoods, predictions, _ = _score_candidates_on_shared_prompt(
        forward, choice_input_ids, choice_labels, choice_attention_mask, ranking
    )
    return log_likelihoods, predictions


def _score_candidates_on_shared_prompt(
    forward: Callable[..., Any],
    choice_input_ids: torch.Tensor,
    choice_labels: torch.Tensor,
    choice_attention_mask: torch.Tensor,
    ranking: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rank_choices_with_shared_prompt`'s work; also ``[B, C]`` whether each candidate is the
    greedy continuation of its prompt (the argmax at each of its positions is its own token)."""
    batch, choices, length = choice_input_ids.shape
    prompt_ids, prompt_mask, _, label_lengths = shared_prompts(choice_input_ids, choice_labels, choice_attention_mask)
    prompts = run_prompts(forward, prompt_ids, prompt_mask)
    device = choice_input_ids.device

    label_width = int(label_lengths.max())
    offsets = torch.arange(label_width, device=device)
    positions = (prompts.lengths[:, None, None] + offsets).expand(batch, choices, label_width)
    label_mask = offsets < label_lengths[..., None]
    label_ids = choice_input_ids.gather(2, positions.clamp_max(length - 1)).masked_fill(~label_mask, 0)
    prompts.cache.batch_repeat_interleave(choices)
    rows = batch * choices
    continuation = forward(
        input_ids=label_ids.reshape(rows, label_width),
        attention_mask=torch.cat(
            [prompts.mask.repeat_interleave(choices, dim=0),
             label_mask.reshape(rows, label_width).to(prompts.mask.dtype)],
            dim=1,
        ),
        position_ids=positions.reshape(rows, label_width),
        use_cache=True,
        **with_cache(forward, prompts.cache),
    )
    # candidate token j is predicted by the prompt's last position (j = 0) or by candidate token j - 1
    predicting = torch.cat(
        [prompts.last_logits.repeat_interleave(choices, dim=0)[:, None], continuation.logits[:, : label_width - 1]],
        dim=1,
    )
    targets = label_ids.reshape(rows, label_width)
    mask = label_mask.reshape(rows, label_width)
    scored = F.cross_entropy(predicting[mask].float(), targets[mask], reduction="none")
    nll = torch.zeros(targets.shape, dtype=scored.dtype, device=device).masked_scatter(mask, scored)
    log_likelihoods = -nll.sum(dim=-1).view(batch, choices)
    greedy = ((predicting.argmax(dim=-1) == targets) | ~mask).all(dim=-1).view(batch, choices)
    return log_likelihoods, best_choices(log_likelihoods, label_lengths, ranking), greedy


def greedy_decode(
    forward: Callable[..., Any],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    settled: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Greedy (argmax) continuation of right-padded prompts, through the model's KV cache.

    Each new token runs at its row's true position (prompt length + step) with a mask that hides
    the prompt padding, so a row decodes what it would decode alone (up to floating-point
    rounding). Decoding does not stop at end-of-text: every row gets ``max_new_tokens`` tokens,
    unless ``settled`` stops it earlier.

    Args:
        forward: the causal LM; called with ``input_ids``, ``attention_mask`` and ``use_cache``,
            then with the cache (under its transformers name) and ``position_ids``.
        prompt_ids: ``[B, P]`` prompts, right-padded.
        prompt_mask: ``[B, P]`` 1 on prompt tokens, 0 on padding.
        max_new_tokens: tokens to decode per row, at least 1.
        settled: called with the ``[B, n]`` tokens decoded so far; True stops decoding there
            (the caller needs no further token of any row).

    Returns:
        ``[B, n]`` the decoded token ids, ``n = max_new_tokens`` unless ``settled`` stopped earlier.

    Raises:
        ValueError: ``max_new_tokens`` < 1.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = run_prompts(forward, prompt_ids, prompt_mask)
    cache, mask = prompts.cache, prompts.mask
    decoded = prompts.last_logits.argmax(dim=-1)[:, None]
    for step in range(max_new_tokens - 1):
        if settled is not None and settled(decoded):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        outputs = forward(
            input_ids=decoded[:, -1:],
            attention_mask=mask,
            position_ids=(prompts.lengths + step)[:, None],
            use_cache=True,
            **with_cache(forward, cache),
        )
        cache = output_cache(outputs)
        decoded = torch.cat([decoded, outputs.logits[:, -1].argmax(dim=-1)[:, None]], dim=1)
    return decoded


def generated_exact_match(
    forward: Callable[..., Any],
    choice_input_ids: torch.Tensor,
    choice_labels: torch.Tensor,
    choice_attention_mask: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Whether greedy decoding after each example's prompt produces its gold label.

    Each prompt is decoded (:func:`greedy_decode`) for at most as many tokens as the batch's
    longest gold label, and the item is right when its first decoded tokens are exactly the gold
    label's tokens. Decoding stops once no item can change its verdict: every item has decoded a
    token off its gold label or all of its gold label (the tokens after those do not count).
    Token ids are compared, not strings (the module has no tokenizer): the gold tokens are those
    the stream built, a space and the label string, then end-of-text when the stream appends it
    (the default), so a generation must also end where the label ends.

    Args:
        forward: the causal LM (as for :func:`greedy_decode`).
        choice_input_ids: ``[B, C, L]`` prompt + candidate label tokens (as for :func:`rank_choices`).
        choice_labels: ``[B, C, L]`` the candidate tokens, ``IGNORE_INDEX`` elsewhere.
        choice_attention_mask: ``[B, C, L]``.
        target: ``[B]`` index of the gold candidate.

    Returns:
        ``[B]`` bool: the decoded tokens equal the gold label's.

    Raises:
        ValueError: see :func:`shared_prompts`.
    """
    prompt_ids, prompt_mask, prompt_lengths, label_lengths = shared_prompts(
        choice_input_ids, choice_labels, choice_attention_mask
    )
    examples = torch.arange(target.shape[0], device=target.device)
    gold_labels = choice_labels[examples, target]  # [B, L]
    gold_lengths = label_lengths[examples, target]
    offsets = torch.arange(int(gold_lengths.max()), device=target.device)
    in_label = offsets < gold_lengths[:, None]
    gold_ids = gold_labels.gather(1, (prompt_lengths[:, None] + offsets).clamp_max(gold_labels.shape[1] - 1))

    def matches(decoded: torch.Tensor) -> torch.Tensor:
        steps = decoded.shape[1]
        return ((decoded == gold_ids[:, :steps]) | ~in_label[:, :steps]).all(dim=-1)

    def settled(decoded: torch.Tensor) -> bool:
        return not bool((matches(decoded) & (gold_lengths > decoded.shape[1])).any())

    decoded = greedy_decode(forward, prompt_ids, prompt_mask, len(offsets), settled=settled)
    return matches(decoded)


def rank_choices_and_exact_match(
    forward: Callable[..., Any],
    choice_input_ids: torch.Tensor,
    choice_labels: torch.Tensor,
    choice_attention_mask: torch.Tensor,
    target: torch.Tensor,
    ranking: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rank_choices_with_shared_prompt` and :func:`generated_exact_match` from its two forward calls.

    Greedy decoding reproduces the gold label exactly when, at every gold position, the most
    likely next token given the gold prefix is the gold token: while it matches, the decoder has
    read exactly that prefix. The candidates' pass computes those next-token logits for the gold
    candidate, so the verdicts need no decoding step; they equal :func:`generated_exact_match`'s
    up to floating-point rounding (a near-tie between two tokens can fall either way).

    Args:
        forward: the causal LM (as for :func:`rank_choices_with_shared_prompt`).
        choice_input_ids: ``[B, C, L]`` prompt + candidate label tokens.
        choice_labels: ``[B, C, L]`` the candidate tokens, ``IGNORE_INDEX`` elsewhere.
        choice_attention_mask: ``[B, C, L]``.
        target: ``[B]`` index of the gold candidate.
        ranking: how the prediction is chosen (:func:`best_choices`).

    Returns:
        ``(log_likelihoods [B, C], predictions [B], generated_correct [B])``.

    Raises:
        ValueError: see :func:`shared_prompts`.
    """
    log_likelihoods, predictions, greedy = _score_candidates_on_shared_prompt(
        forward, choice_input_ids, choice_labels, choice_attention_mask, ranking
    )
    return log_likelihoods, predictions, greedy.gather(1, target[:, None]).squeeze(1)
