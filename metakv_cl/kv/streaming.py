"""Reading long inputs through a compacted cache: chunked prefill, streaming likelihood, generation."""

from __future__ import annotations

from typing import Any

import torch

from metakv_cl.kv.attention import enable_compacted_attention
from metakv_cl.kv.cache import CompactedCache
from metakv_cl.transformers_api import with_cache


def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor, got {shape}")
    return input_ids


def default_chunk_size(cache: CompactedCache, requested: int | None) -> int:
    """The prefill chunk: ``requested``, or an eighth of the cache (at least 16, at most 512 tokens)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"chunk_size must be >= 1, got {requested}")
        return requested
    if cache.max_tokens is None:
        return 512
    return max(16, min(512, cache.max_tokens // 8))


def _refuses_probes(model: torch.nn.Module) -> None:
    """Probe passes would advance a dynamic Meta-KV meta-state; refuse them for such models."""
    try:
        from metakv_cl.modeling import get_meta_kv, has_meta_kv
    except ImportError:
        return
    if has_meta_kv(model) and get_meta_kv(model).config.dynamic_source is not None:
        raise ValueError(
            "repeat_queries re-reads each chunk, which would advance the dynamic Meta-KV meta-state; "
            "use repeat_queries=False with a dynamic Meta-KV source"
        )


@torch.no_grad()
def _forward_chunk(model, cache: CompactedCache, chunk: torch.Tensor, keep_logits: int) -> torch.Tensor:
    positions = cache.position_ids(chunk.shape[1], chunk.shape[0], device=chunk.device)
    output = model(input_ids=chunk, position_ids=positions, use_cache=True, logits_to_keep=keep_logits, **with_cache(model, cache))
    return output.logits


@torch.no_grad()
def stream_log_likelihood(
    model: torch.nn.Module,
    cache: CompactedCache,
    input_ids: torch.Tensor,
    *,
    score_from: int = 1,
    chunk_size: int | None = None,
    repeat_queries: bool = False,
    progress: Any = None,
) -> tuple[float, int, torch.Tensor]:
    """Read ``input_ids`` chunk by chunk through ``cache`` and score the tokens from ``score_from`` on.

    The cache compacts whenever it would exceed its budget, so the input may be far longer than
    the model's position limit (see :class:`CompactedCache` for how positions are assigned).

    Args:
        model: a causal LM (GPT-2, Llama family), Meta-KV or not.
        cache: the :class:`CompactedCache` (usually empty).
        input_ids: [batch, tokens].
        score_from: first token index whose log-likelihood is summed (it is predicted from the
            tokens before it); ``tokens`` scores nothing (plain prefill).
        chunk_size: tokens per forward call (default :func:`default_chunk_size`).
        repeat_queries: after each chunk, re-read it as a probe so that methods needing
            reference queries also get queries that attend to it (Attention Matching's
            repeat-the-context queries); the probe's tokens are dropped afterwards.
        progress: optional callable receiving the number of tokens read after each chunk.

    Returns:
        (summed negative log-likelihood, number of scored tokens, logits of the last token
        [batch, vocab]).

    Raises:
        ValueError: bad inputs, or chunks that would run past learned positions.
    """
    input_ids = _check_ids(input_ids)
    total = input_ids.shape[1]
    if not 1 <= score_from <= total:
        raise ValueError(f"score_from must be in [1, {total}], got {score_from}")
    chunk_size = default_chunk_size(cache, chunk_size)
    cache.check_position_room(2 * chunk_size if repeat_queries else chunk_size, total=total)
    if repeat_queries:
        _refuses_probes(model)
    enable_compacted_attention(model)
    nll, scored = 0.0, 0
    previous_logits: torch.Tensor | None = None  # logits of the token before the current chunk
    for start in range(0, total, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        end = start + chunk.shape[1]
        # Full logits only for chunks that hold scored predictions.
        keep = 0 if end > score_from else 1
        logits = _forward_chunk(model, cache, chunk, keep)
        if keep == 0:
            # Position i of a chunk predicts token start + i + 1; the previous chunk predicts `start`.
            if previous_logits is None:
                predictions, first = logits[:, :-1], start + 1
            else:
                predictions, first = torch.cat([previous_logits, logits[:, :-1]], dim=1), start
            targets = input_ids[:, first:end]
            from_index = max(score_from, first) - first
            log_probs = torch.log_softmax(predictions[:, from_index:].float(), dim=-1)
            picked = log_probs.gather(-1, targets[:, from_index:].unsqueeze(-1)).squeeze(-1)
            nll -= float(picked.sum())
            scored += picked.numel()
        previous_logits = logits[:, -1:]
        if repeat_queries and cache.method.needs_queries:
            with cache.probing():
                _forward_chunk(model, cache, chunk, 1)
        if progress is not None:
            progress(end)
    return nll, scored, previous_logits[:, -1]


@torch.no_grad()
def repeat_prefill(model: torch.nn.Module, cache: CompactedCache, context_ids: torch.Tensor, *,
                   chunk_size: int | None = None) -> None:
    """Attention Matching's repeat-prefill: read the context again after itself, keeping only that reading's queries.

    Zweiger et al. (2026) take the reference queries of a one-shot compaction from the context
    read a second time after itself, so that they attend to the context as the tokens that
    follow it will: every key is in their past. The second reading is a probe
    (:meth:`CompactedCache.probing`): its tokens are dropped afterwards, and the reference
    queries captured before it are replaced by its own. Call it after the context was read
    into ``cache`` and before compacting.

    Args:
        model: the causal LM that read the context.
        cache: the cache holding the context (uncompacted).
        context_ids: [batch, tokens], the context as it was read.
        chunk_size: tokens per forward call (default :func:`default_chunk_size`).

    Raises:
        ValueError: a model with learned positions too short for twice the context, or a
            dynamic Meta-KV source (the probe would advance its meta-state).
    """
    context_ids = _check_ids(context_ids)
    chunk_size = default_chunk_size(cache, chunk_size)
    _refuses_probes(model)
    cache.check_position_room(chunk_size, total=context_ids.shape[1])  # on top of the context held
    enable_compacted_attention(model)
    for layer in cache.compacted_layers:
        layer.forget_reference_queries()
    first = cache.next_position()  # a probe does not advance seen_tokens: count its positions here
    batch = context_ids.shape[0]
    with cache.probing():
        for start in range(0, context_ids.shape[1], chunk_size):
            chunk = context_ids[:, start : start + chunk_size]
            positions = (torch.arange(chunk.shape[1], device=chunk.device) + first + start).unsqueeze(0).expand(batch, -1)
            model(input_ids=chunk, position_ids=positions, use_cache=True, logits_to_keep=1, **with_cache(model, cache))


@torch.no_grad()
def chunked_prefill(
    model: torch.nn.Module,
    cache: CompactedCache,
    input_ids: torch.Tensor,
    *,
    chunk_size: int | None = None,
    repeat_queries: bool = False,
    progress: Any = None,
) -> torch.Tensor:
    """Read a long input into ``cache`` chunk by chunk, compacting as needed.

    Args: as :func:`stream_log_likelihood`.

    Returns:
        Logits of the last token [batch, vocab].
    """
    input_ids = _check_ids(input_ids)
    _, _, logits = stream_log_likelihood(
        model, cache, input_ids, score_from=input_ids.shape[1], chunk_size=chunk_size,
        repeat_queries=repeat_queries, progress=progress,
    )
    return logits


@torch.no_grad()
def continuation_log_likelihood(
    model: torch.nn.Module,
    cache: CompactedCache,
    last_logits: torch.Tensor,
    continuation: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> tuple[float, int]:
    """Score ``continuation`` read after what ``cache`` holds (for example a context compacted once).

    Args:
        model: the causal LM.
        cache: a filled :class:`CompactedCache`.
        last_logits: logits of the context's last token [batch, vocab] (what
            :func:`chunked_prefill` returns), which predict the continuation's first token.
        continuation: [batch, tokens] ids, every one of them scored.
        chunk_size: tokens per forward call (default :func:`default_chunk_size`).

    Returns:
        (summed negative log-likelihood, number of scored tokens).
    """
    continuation = _check_ids(continuation)
    first = torch.log_softmax(last_logits.float(), dim=-1).gather(-1, continuation[:, :1].to(last_logits.device))
    nll, scored, _ = stream_log_likelihood(model, cache, continuation, score_from=1, chunk_size=chunk_size)
    return nll - float(first.sum()), scored + continuation.shape[0]


def generate(
    model: torch.nn.Module,
    cache: CompactedCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` continuing from what ``cache`` holds, with positions from its policy.

    transformers' ``generate`` derives positions from the length of the attention mask; here the
    mask covers the held entries plus the new tokens, and explicit ``position_ids`` follow the
    cache's position policy (so GPT-2 stays inside its position table however much was read).

    Args:
        model: a causal LM.
        cache: a :class:`CompactedCache`, empty or filled (by :func:`chunked_prefill`).
        input_ids: the new tokens [batch, tokens] (left-padded rows are fine).
        attention_mask: [batch, tokens] mask of the new tokens (default all ones).
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ...).

    Returns:
        What ``model.generate`` returns (the new tokens after ``input_ids`` by default).

    Raises:
        ValueError: inputs whose batch does not match the cache, or a bad mask.
    """
    input_ids = _check_ids(input_ids)
    batch, length = input_ids.shape
    held = cache.held_entries()
    held_batch = next((layer.keys.shape[0] for layer in cache.layers if layer.is_initialized), batch)
    if held_batch != batch:
        raise ValueError(f"the cache holds batch {held_batch}, input_ids has {batch}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    enable_compacted_attention(model)
    # generate() expands the inputs for several sequences per prompt, but not a cache passed in.
    expand = max(int(generate_kwargs.get("num_beams") or 1), int(generate_kwargs.get("num_return_sequences") or 1))
    if expand > 1 and held:
        cache.batch_repeat_interleave(expand)
    max_new = int(generate_kwargs.get("max_new_tokens") or 0)
    cache.check_position_room(length + max_new, total=length + max_new)
    full_mask = torch.cat([attention_mask.new_ones(batch, held), attention_mask], dim=1)
    positions = cache.position_ids(length, attention_mask=attention_mask)
    return model.generate(
        input_ids, attention_mask=full_mask, position_ids=positions, **with_cache(model, cache), **generate_kwargs
    )
