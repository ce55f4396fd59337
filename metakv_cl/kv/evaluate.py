"""Evaluation of compacted KV caches: ``metakv-cl kv-eval``, ``metakv-cl niah`` and ``metakv-cl ruler``.

``kv-eval``: perplexity of the continuation of long articles (WikiText-2 by default, or
``--data-root``: any text file or folder of ``.txt`` articles), read through a cache compacted
to a budget (a fraction of the context), for every method and budget, with the cache's bytes,
compaction time and throughput, to ``kv_eval.json`` and a plot of perplexity against cache
size, ``kv_eval.png``. Two protocols (``--protocol``, one or both):

* ``streaming``: the cache holds the budget from the start and compacts as the context
  streams in, chunk by chunk (re-compacting what it compacted before);
* ``oneshot``: the context is read with a full cache, compacted once to the budget, and the
  continuation is scored through the compacted cache (the protocol of Attention Matching and
  kvpress; one prefill per method serves every budget).

::

    metakv-cl kv-eval --model smollm2 --articles 2 --context 2048 --continuation 256 \\
        --budgets 0.5,0.2,0.1,0.05,0.02 --protocol oneshot,streaming --out-dir results/kv

``niah``: needle in a haystack. A passcode sentence is placed at chosen depths of WikiText
haystacks of chosen lengths; the model reads the haystack through the compacted cache and
must generate the passcode after a question. Accuracy per method, budget, length and depth
to ``niah.json`` and a heatmap per method and budget, ``niah.png``::

    metakv-cl niah --model smollm2 --lengths 1024,2048 --depths 0,0.5,1 --budgets 0.2,0.05

``ruler``: task accuracy, not only perplexity. RULER-style synthetic tasks
(:mod:`metakv_cl.kv.ruler`: single, multi-key and multi-value needles, variable tracking,
common-word extraction) at chosen lengths; each example's context is read once per method with a
full cache, compacted one-shot to every budget, and the question is answered greedily through the
compacted cache. Mean score (with a bootstrap interval) per task, length, method and budget, and
every example's answer, to ``ruler.json``; a heatmap of the scores, ``ruler.png``::

    metakv-cl ruler --model smollm2 --tasks niah_single,variable_tracking --lengths 2048 --examples 5 \\
        --methods full,h2o,attention_matching --budgets 0.5,0.2 --out-dir results/ruler

Models: ``gpt2-tiny-random`` (a 2-layer random GPT-2 with the real tokenizer, for smoke
runs), ``smollm2`` (SmolLM2-135M from the offline GGUF), or any transformers name or path.
``--meta-kv SOURCE`` adds Meta-KV attention (``--meta-kv-weights DIR`` loads trained weights).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from metakv_cl.files import read_text
from metakv_cl.kv.arguments import PROTOCOLS, SMOLLM2, TINY_RANDOM_GPT2, kv_eval_parser, niah_parser, ruler_parser
from metakv_cl.kv.cache import CompactedCache
from metakv_cl.kv.registry import available_methods, get_method
from metakv_cl.kv.ruler import TASKS, RulerExample, RulerGenerator, haystack_sentences, score_prediction, vocabulary
from metakv_cl.kv.streaming import (
    chunked_prefill,
    continuation_log_likelihood,
    default_chunk_size,
    generate,
    repeat_prefill,
    stream_log_likelihood,
)

ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


# --- models and data -----------------------------------------------------------------------
def load_model(name: str, *, meta_kv: str | None = None, meta_kv_weights: str | None = None, seed: int = 0,
               device: str = "cpu"):
    """Load a causal LM and its tokenizer for evaluation.

    Args:
        name: ``gpt2-tiny-random``, ``smollm2`` or a transformers name/path.
        meta_kv: a Meta-KV source (``mean``, ``consolidated``, ...) to add, or None.
        meta_kv_weights: directory of saved Meta-KV weights to load (needs ``meta_kv``).
        seed: seed of random initialisation.
        device: torch device.

    Returns:
        (model in eval mode, tokenizer with a pad token).

    Raises:
        FileNotFoundError: an offline source is missing. ValueError: weights without a source.
    """
    from metakv_cl import hub

    torch.manual_seed(seed)
    if name == TINY_RANDOM_GPT2:
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = hub.offline_gpt2_tokenizer()
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer))
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    elif name == SMOLLM2:
        from transformers import AutoTokenizer

        folder, gguf_file = hub.smollm2_gguf_path()
        model = hub.load_causal_lm(folder, gguf_file=gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    else:
        model, tokenizer = hub.load_causal_lm(name), hub.load_tokenizer(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if meta_kv_weights is not None and meta_kv is None:
        raise ValueError("--meta-kv-weights needs --meta-kv SOURCE (the configuration the weights were trained with)")
    if meta_kv is not None:
        from metakv_cl.modeling import MetaKVConfig, add_meta_kv, load_meta_kv

        add_meta_kv(model, MetaKVConfig(source=meta_kv))
        if meta_kv_weights is not None:
            load_meta_kv(model, meta_kv_weights)
    return model.to(device).eval(), tokenizer


def default_data_root() -> Path:
    from metakv_cl.data.dbpedia import default_data_root as shared_root

    return shared_root()


def wikitext_articles(path: str | Path) -> list[str]:
    """The articles of a WikiText file (each starts at a `` = Title = `` line).

    Raises:
        FileNotFoundError: if the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WikiText file not found: {path} (see ../shared/data/README.md, or pass --data-root)")
    return split_at_titles(read_text(path, "WikiText file"))


def split_at_titles(text: str) -> list[str]:
    """The articles of a WikiText-formatted text (each starts at a `` = Title = `` line); [] if it has no titles."""
    articles: list[list[str]] = []
    for line in text.splitlines():
        if ARTICLE_HEADING.match(line):
            articles.append([])
        if articles:
            articles[-1].append(line)
    return ["\n".join(lines) for lines in articles]


def long_articles(source: str | Path | None) -> list[str]:
    """The articles of ``--data-root``: a text file, a folder of ``.txt`` articles, or the shared data folder.

    Args:
        source: a text file (split at WikiText `` = Title = `` lines when it has them, else one
            article); a folder holding ``wikitext2/valid.txt`` (the shared data, also the
            default when None); or any other folder, whose ``.txt`` files (sorted by name) are
            one article each.

    Returns:
        The articles' texts.

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds no ``.txt`` file.
        ValueError: a file is not UTF-8 text.
    """
    path = Path(source) if source is not None else default_data_root()
    if path.is_file():
        text = read_text(path, "article file")
        return split_at_titles(text) or [text]
    if (path / "wikitext2" / "valid.txt").is_file():
        return wikitext_articles(path / "wikitext2" / "valid.txt")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .txt articles (and no wikitext2/valid.txt); pass a text file or a folder of .txt files")
        return [read_text(file, "article file") for file in files]
    raise FileNotFoundError(f"--data-root {path} is neither a text file nor a folder (see ../shared/data/README.md)")


def article_windows(tokenizer, articles: Sequence[str], length: int, count: int, skip: int = 0) -> torch.Tensor:
    """The first ``length`` tokens of ``count`` articles that are long enough, after passing over
    the first ``skip`` such articles, [count, length].

    Raises:
        ValueError: if fewer than ``skip + count`` articles have ``length`` tokens.
    """
    windows = []
    for article in articles:
        ids = tokenizer(article, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            windows.append(ids[:length])
            if len(windows) == skip + count:
                return torch.tensor(windows[skip:])
    raise ValueError(f"only {len(windows)} articles have {length} tokens, {skip + count} are needed "
                     "(--skip-articles + --articles); lower --context/--continuation, --articles or --skip-articles")


def parse_method_options(options: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["attention_matching.selection=omp"]`` -> ``{"attention_matching": {"selection": "omp"}}``.

    Raises:
        ValueError: an option not of the form ``method.key=value``.
    """
    parsed: dict[str, dict[str, Any]] = {}
    for option in options:
        match = re.fullmatch(r"([\w-]+)\.(\w+)=(.*)", option)
        if match is None:
            raise ValueError(f"method option {option!r} must look like METHOD.KEY=VALUE")
        method, key, raw = match.groups()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        parsed.setdefault(method, {})[key] = value
    return parsed


def _methods(spec: str) -> list[str]:
    names = list(available_methods()) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        get_method(name)  # unknown names fail here, listing the known ones
    return names


def _protocols(spec: str) -> list[str]:
    protocols = [p.strip() for p in spec.split(",") if p.strip()]
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r} in --protocol; choose from {', '.join(PROTOCOLS)} (comma-separated)")
    if not protocols:
        raise ValueError(f"--protocol needs at least one of {', '.join(PROTOCOLS)}")
    return protocols


def _numbers(spec: str, option: str, kind: type) -> list:
    """The comma-separated ``kind`` values of ``option`` (``--lengths``, ``--depths``).

    Raises:
        ValueError: an entry is not a number of that kind (the option and entry named).
    """
    try:
        return [kind(entry) for entry in spec.split(",")]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated {kind.__name__} values, got {spec!r}") from None


def _model(args: argparse.Namespace):
    """(model, tokenizer) of the evaluation commands' shared model options."""
    return load_model(args.model, meta_kv=args.meta_kv, meta_kv_weights=args.meta_kv_weights, seed=args.seed,
                      device=args.device)


def _budgets(spec: str) -> list[float]:
    try:
        budgets = [float(b) for b in spec.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated fractions, got {spec!r}") from None
    for budget in budgets:
        if not 0 < budget <= 1:
            raise ValueError(f"budgets must be in (0, 1], got {budget}")
    return budgets


@dataclass
class RunSettings:
    """What every compacted-cache run of a sweep shares."""

    chunk_size: int | None
    headroom: float
    reference_queries: int
    repeat_queries: bool
    method_options: dict[str, dict[str, Any]]

    def cache(self, model, method: str, budget: float, context: int) -> CompactedCache:
        """An empty cache of ``method`` holding ``budget`` of ``context`` tokens."""
        compressor = get_method(method, **self.method_options.get(method, {}))
        return CompactedCache(
            compressor,
            None if compressor.unbounded else max(1, round(budget * context)),
            config=model.config,
            headroom=self.headroom,
            reference_queries=self.reference_queries,
        )


def _skip_reason(cache: CompactedCache, chunk: int, total: int) -> str | None:
    """Why a run cannot happen (a model with learned positions too short for it), or None."""
    try:
        cache.check_position_room(chunk, total=total)
    except ValueError as error:
        return str(error)
    return None


def method_budgets(method: str, budgets: Sequence[float]) -> list[float]:
    """The budgets a method runs at: ``budgets``, or only 1.0 for a method that never drops anything (the full cache)."""
    return [1.0] if get_method(method).unbounded else list(budgets)


@dataclass
class OneshotPrefill:
    """A context read once with a full cache for one method: the start of every budget's one-shot compaction.

    Attributes:
        method: the method's name.
        cache: the full cache, with what the method needs captured (:mod:`metakv_cl.kv.oneshot`); never compacted.
        last_logits: the logits of the context's last token [batch, vocab].
        chunk_size: tokens per forward call of the prefill (and of what follows).
        seconds: the prefill's time.
        full_bytes: the full cache's size.
    """

    method: str
    cache: CompactedCache
    last_logits: torch.Tensor
    chunk_size: int
    seconds: float
    full_bytes: int

    def compacted(self, budget: float) -> tuple[CompactedCache, float]:
        """A copy of the prefilled cache compacted to ``budget`` (all layers at once), and the compaction's time."""
        cache = copy.deepcopy(self.cache)
        started = time.perf_counter()
        cache.compact(budget)
        return cache, time.perf_counter() - started


def oneshot_prefill(model, context_ids: torch.Tensor, method: str, settings: RunSettings,
                    follow: int = 0) -> OneshotPrefill | str:
    """Read ``context_ids`` [batch, tokens] with a full cache that captures what ``method`` needs.

    Args:
        model: the causal LM.
        context_ids: the context, on the model's device.
        method: a registered method name (its options from ``settings``).
        settings: shared run settings.
        follow: tokens that will be read after the context (to check the model has positions for them).

    Returns:
        The prefill, or why it cannot run (a model with learned positions too short for it).
    """
    compressor = get_method(method, **settings.method_options.get(method, {}))
    cache = CompactedCache(compressor, None, config=model.config, reference_queries=settings.reference_queries)
    chunk = default_chunk_size(cache, settings.chunk_size)
    repeat = compressor.reference == "repeat"  # a second reading of the context (Attention Matching's repeat-prefill)
    reason = _skip_reason(cache, chunk, context_ids.shape[1] + max(follow, context_ids.shape[1] if repeat else 0))
    if reason is not None:
        return reason
    started = time.perf_counter()
    last_logits = chunked_prefill(model, cache, context_ids, chunk_size=chunk)
    if repeat:
        repeat_prefill(model, cache, context_ids, chunk_size=chunk)
    return OneshotPrefill(method, cache, last_logits, chunk, time.perf_counter() - started, cache.nbytes)


# --- perplexity ----------------------------------------------------------------------------
def perplexity_sweep(model, token_windows: torch.Tensor, context: int, methods: Sequence[str], budgets: Sequence[float],
                     settings: RunSettings, log=None, on_row=None, protocol: str = "streaming") -> list[dict[str, Any]]:
    """Continuation perplexity for every method and budget, under one protocol.

    Args:
        model: the causal LM.
        token_windows: [articles, context + continuation] token ids (read as one batch).
        context: tokens of context; the rest is the scored continuation.
        methods, budgets: the sweep (the full cache runs once, whatever the budgets).
        settings: shared run settings.
        log: progress printer (default: tqdm.write).
        on_row: called with the rows so far after each run (to save partial results).
        protocol: ``"streaming"`` or ``"oneshot"`` (see the module docstring).

    Returns:
        One dict per run (see the module docstring), each with its ``protocol``; skipped runs
        carry ``skipped``.

    Raises:
        ValueError: an unknown protocol.
    """
    if protocol == "oneshot":
        return oneshot_sweep(model, token_windows, context, methods, budgets, settings, log, on_row)
    if protocol != "streaming":
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    from tqdm.auto import tqdm

    log = log or tqdm.write
    rows = []
    device = next(model.parameters()).device
    ids = token_windows.to(device)
    total = ids.shape[1]
    runs = [(m, b) for m in methods for b in method_budgets(m, budgets)]
    for method, budget in tqdm(runs, desc="kv-eval", unit="run"):
        cache = settings.cache(model, method, budget, context)
        chunk = default_chunk_size(cache, settings.chunk_size)
        row: dict[str, Any] = {"protocol": "streaming", "method": method, "budget": budget, "max_tokens": cache.max_tokens,
                               "chunk_size": chunk}
        reason = _skip_reason(cache, 2 * chunk if settings.repeat_queries else chunk, total)
        if reason is not None:
            rows.append({**row, "skipped": reason})
            log(f"skip {method} @ {budget:g}: {reason}")
            if on_row is not None:
                on_row(rows)
            continue
        started = time.perf_counter()
        nll, scored, _ = stream_log_likelihood(
            model, cache, ids, score_from=context, chunk_size=chunk, repeat_queries=settings.repeat_queries
        )
        seconds = time.perf_counter() - started
        stats = cache.stats()
        full_bytes = sum(layer.full_token_bytes for layer in cache.layers) * total
        row.update(
            perplexity=math.exp(nll / scored),
            nll_per_token=nll / scored,
            scored_tokens=scored,
            peak_bytes=stats["peak_bytes"],
            final_bytes=stats["bytes"],
            full_cache_bytes=full_bytes,
            peak_fraction_of_full=stats["peak_bytes"] / full_bytes,
            overhead_bytes=stats["overhead_bytes"],
            compactions=stats["compactions"],
            compaction_seconds=stats["compaction_seconds"],
            wall_seconds=seconds,
            tokens_per_second=ids.numel() / seconds,
        )
        rows.append(row)
        log(f"{method:>20} @ {budget:<5g} ppl {row['perplexity']:9.3f}  peak {stats['peak_bytes'] / 2**20:8.2f} MiB  "
            f"compaction {stats['compaction_seconds']:7.2f} s  {row['tokens_per_second']:8.1f} tok/s")
        if on_row is not None:
            on_row(rows)
    return rows


def oneshot_sweep(model, token_windows: torch.Tensor, context: int, methods: Sequence[str], budgets: Sequence[float],
                  settings: RunSettings, log=None, on_row=None) -> list[dict[str, Any]]:
    """Continuation perplexity after one compaction of the whole context, for every method and budget.

    Per method, the context is read once with a full cache that captures what the method needs
    (:mod:`metakv_cl.kv.oneshot`); each budget compacts a copy of it (all layers at once) and
    scores the continuation through it. Arguments and rows as :func:`perplexity_sweep`; a row's
    ``cache_bytes`` is the compacted cache's size and ``compaction_seconds`` the compaction's time.
    """
    from tqdm.auto import tqdm

    log = log or tqdm.write
    rows: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    ids = token_windows.to(device)
    for method in tqdm(methods, desc="kv-eval oneshot", unit="method"):
        prefill = oneshot_prefill(model, ids[:, :context], method, settings, follow=ids.shape[1] - context)
        if isinstance(prefill, str):
            rows.extend({"protocol": "oneshot", "method": method, "budget": b, "skipped": prefill}
                        for b in method_budgets(method, budgets))
            log(f"skip {method}: {prefill}")
            continue
        for budget in method_budgets(method, budgets):
            cache, compaction_seconds = prefill.compacted(budget)
            cache_bytes = cache.nbytes  # before the continuation joins the cache
            nll, scored = continuation_log_likelihood(model, cache, prefill.last_logits, ids[:, context:],
                                                      chunk_size=prefill.chunk_size)
            row = {
                "protocol": "oneshot", "method": method, "budget": budget, "chunk_size": prefill.chunk_size,
                "perplexity": math.exp(nll / scored), "nll_per_token": nll / scored, "scored_tokens": scored,
                "cache_bytes": cache_bytes, "context_full_bytes": prefill.full_bytes,
                "cache_fraction_of_full": cache_bytes / prefill.full_bytes,
                "compaction_seconds": compaction_seconds, "prefill_seconds": prefill.seconds,
            }
            rows.append(row)
            log(f"{method:>20} @ {budget:<5g} one-shot ppl {row['perplexity']:9.3f}  cache {cache_bytes / 2**20:8.2f} MiB  "
                f"compaction {compaction_seconds:7.2f} s")
            if on_row is not None:
                on_row(rows)
    return rows


def plot_perplexity(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Perplexity against cache size (MiB, log scale), one line per method and protocol.

    The size is the peak while streaming, and the compacted cache's size one-shot.
    """
    from matplotlib import colormaps

    from metakv_cl.plotting import new_figure, save_figure

    figure = new_figure(figsize=(8, 5.5))
    axis = figure.subplots()
    done = [r for r in rows if "skipped" not in r]
    colors, markers = colormaps["tab20"].colors, "os^vD<>ph*Xd"
    protocols = {r["protocol"] for r in done}
    for index, (method, protocol) in enumerate(sorted({(r["method"], r["protocol"]) for r in done})):
        points = sorted((r.get("cache_bytes", r.get("peak_bytes")) / 2**20, r["perplexity"]) for r in done
                        if (r["method"], r["protocol"]) == (method, protocol))
        xs, ys = zip(*points)
        label = method if len(protocols) == 1 else f"{method} ({protocol})"
        style = {"color": colors[2 * index % 20 + index // 10], "label": label,
                 "linestyle": "--" if protocol == "oneshot" and len(protocols) > 1 else "-"}
        if len(points) == 1:
            axis.scatter(xs, ys, marker="*", s=160, zorder=3, **style)
        else:
            axis.plot(xs, ys, marker=markers[index % len(markers)], **style)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("KV cache size (MiB, all layers; streaming: peak, one-shot: compacted)")
    axis.set_ylabel("continuation perplexity")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)


# --- needle in a haystack ------------------------------------------------------------------
NEEDLE = " The secret passcode is {code}."
QUESTION = "\nQuestion: What is the secret passcode?\nAnswer: The secret passcode is"


def needle_samples(tokenizer, haystack_ids: Sequence[int], length: int, depth: float, samples: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Haystacks with a passcode at ``depth``: (contexts [samples, n], question ids [samples, q], codes).

    The context plus the question is ``length`` tokens. Each sample takes its haystack from a
    different offset of ``haystack_ids`` and has its own five-digit code.

    Raises:
        ValueError: if the haystack text is too short or the length too small.
    """
    generator = torch.Generator().manual_seed(seed)
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    contexts, codes = [], []
    for _ in range(samples):
        code = str(int(torch.randint(10000, 100000, (1,), generator=generator)))
        needle = tokenizer(NEEDLE.format(code=code), add_special_tokens=False)["input_ids"]
        filler = length - len(question) - len(needle)
        if filler < 1:
            raise ValueError(f"length {length} is too short for the needle and the question")
        if len(haystack_ids) < filler:
            raise ValueError(f"the haystack text has {len(haystack_ids)} tokens, {filler} are needed")
        start = int(torch.randint(0, len(haystack_ids) - filler + 1, (1,), generator=generator))
        hay = list(haystack_ids[start : start + filler])
        at = round(depth * filler)
        contexts.append(hay[:at] + needle + hay[at:])
        codes.append(code)
    return torch.tensor(contexts), torch.tensor([question] * samples), codes


def needle_sweep(model, tokenizer, haystack_ids: Sequence[int], methods: Sequence[str], budgets: Sequence[float],
                 lengths: Sequence[int], depths: Sequence[float], samples: int, settings: RunSettings, seed: int,
                 log=None) -> list[dict[str, Any]]:
    """Needle retrieval accuracy for every method, budget, haystack length and depth."""
    from tqdm.auto import tqdm

    log = log or tqdm.write
    device = next(model.parameters()).device
    rows = []
    runs = [(m, b, n, d) for m in methods for b in method_budgets(m, budgets) for n in lengths for d in depths]
    for method, budget, length, depth in tqdm(runs, desc="niah", unit="run"):
        contexts, questions, codes = needle_samples(tokenizer, haystack_ids, length, depth, samples, seed)
        cache = settings.cache(model, method, budget, contexts.shape[1])
        chunk = default_chunk_size(cache, settings.chunk_size)
        row: dict[str, Any] = {"method": method, "budget": budget, "length": length, "depth": depth, "samples": samples}
        answer_tokens = max(len(tokenizer(f" {c}.", add_special_tokens=False)["input_ids"]) for c in codes)
        reason = _skip_reason(cache, max(chunk, questions.shape[1] + answer_tokens), length + answer_tokens)
        if reason is not None:
            rows.append({**row, "skipped": reason})
            continue
        chunked_prefill(model, cache, contexts.to(device), chunk_size=chunk, repeat_queries=settings.repeat_queries)
        output = generate(model, cache, questions.to(device), max_new_tokens=answer_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(output[:, questions.shape[1]:], skip_special_tokens=True)
        hits = [code in answer for code, answer in zip(codes, answers)]
        row.update(accuracy=sum(hits) / len(hits), peak_bytes=cache.peak_bytes, answers=answers)
        rows.append(row)
        log(f"{method:>20} @ {budget:<5g} length {length:>6} depth {depth:<4g} accuracy {row['accuracy']:.2f}")
    return rows


def plot_needle(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """A lengths x depths accuracy heatmap per (method, budget)."""
    from metakv_cl.plotting import new_figure, save_figure

    done = [r for r in rows if "skipped" not in r]
    panels = sorted({(r["method"], r["budget"]) for r in done})
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    columns = min(4, max(1, len(panels)))
    lines = max(1, math.ceil(len(panels) / columns))
    figure = new_figure(figsize=(3.4 * columns, 3.0 * lines + 0.6), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False)
    image = None
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    for axis, (method, budget) in zip(axes.flat, panels):
        grid = torch.full((len(lengths), len(depths)), float("nan"))
        for r in done:
            if (r["method"], r["budget"]) == (method, budget):
                grid[lengths.index(r["length"]), depths.index(r["depth"])] = r["accuracy"]
        image = axis.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (row, column), value in zip(torch.cartesian_prod(torch.arange(len(lengths)), torch.arange(len(depths))).tolist(),
                                        grid.flatten().tolist()):
            if not math.isnan(value):
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
        axis.set_title(f"{method} @ {budget:g}", fontsize=9)
        axis.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        axis.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        axis.set_xlabel("needle depth", fontsize=8)
        axis.set_ylabel("haystack tokens", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="retrieval accuracy")
    figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


# --- RULER-style tasks ---------------------------------------------------------------------
def ruler_generator(tokenizer, articles: Sequence[str]) -> RulerGenerator:
    """A :class:`RulerGenerator` whose haystack sentences and word pool come from WikiText-formatted articles.

    Heading lines are dropped and WikiText's tokenisation is undone (:func:`detokenize_wikitext`).

    Raises:
        ValueError: the articles have too few sentences or words.
    """
    from metakv_cl.data.wikitext import detokenize_wikitext

    paragraphs = [detokenize_wikitext(line) for article in articles for line in article.splitlines()
                  if line.strip() and not line.strip().startswith("=")]
    return RulerGenerator(tokenizer, haystack_sentences(paragraphs), vocabulary(paragraphs))


def ruler_sweep(model, tokenizer, examples: Sequence[RulerExample], methods: Sequence[str], budgets: Sequence[float],
                settings: RunSettings, log=None, on_example=None, question_aware: bool = False) -> list[dict[str, Any]]:
    """Greedy answers to RULER-style examples through one-shot compacted caches, for every method and budget.

    Per example and method, the context is read once with a full cache (:func:`oneshot_prefill`);
    each budget compacts a copy of it, the question is read through the compacted cache and the
    answer is decoded greedily (``example.answer_tokens`` tokens) and scored
    (:func:`~metakv_cl.kv.ruler.score_prediction`). Examples are read one at a time.

    Question-aware (kvpress's query-aware setting, and SnapKV's own: its observation window is the
    question), the prefill reads the context and the question but its last token, so the
    attention-ranked methods see the question's queries; the compaction then covers the question's
    entries too, the budget counting them, and decoding starts from the question's last token.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (decodes the answers).
        examples: the examples (:meth:`RulerGenerator.examples`).
        methods, budgets: the sweep (the full cache runs at 1.0 only).
        settings: shared run settings.
        log: progress printer (default: tqdm.write).
        on_example: called with the records so far after each example (to save partial results).

    Returns:
        One record per example, method and budget: ``task``, ``length``, ``index``, ``depth``,
        ``answers``, ``method``, ``budget``, and ``prediction``, ``score``, ``cache_fraction_of_full``,
        or ``skipped`` (why the run could not happen).
    """
    from tqdm.auto import tqdm

    log = log or tqdm.write
    device = next(model.parameters()).device
    records: list[dict[str, Any]] = []
    for example in tqdm(examples, desc="ruler", unit="example"):
        context = torch.tensor([example.context_ids], device=device)
        question = torch.tensor([example.question_ids], device=device)
        if question_aware:  # the question but its last token joins the prefill; that token starts decoding
            context, question = torch.cat([context, question[:, :-1]], dim=1), question[:, -1:]
        about = {"task": example.task, "length": example.length, "index": example.index, "depth": example.depth,
                 "answers": list(example.answers)}
        first = len(records)
        for method in methods:
            prefill = oneshot_prefill(model, context, method, settings, follow=question.shape[1] + example.answer_tokens)
            if isinstance(prefill, str):
                records.extend({**about, "method": method, "budget": b, "skipped": prefill} for b in method_budgets(method, budgets))
                continue
            for budget in method_budgets(method, budgets):
                cache, _ = prefill.compacted(budget)
                cache_fraction = cache.nbytes / prefill.full_bytes  # before the question and answer join the cache
                output = generate(model, cache, question, max_new_tokens=example.answer_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
                prediction = tokenizer.decode(output[0, question.shape[1]:], skip_special_tokens=True)
                records.append({**about, "method": method, "budget": budget, "prediction": prediction,
                                "score": score_prediction(prediction, example.answers, example.metric),
                                "cache_fraction_of_full": cache_fraction})
        done = [r for r in records[first:] if "score" in r]
        log(f"{example.task} #{example.index} ({example.length} tokens): "
            + "  ".join(f"{r['method']}@{r['budget']:g} {r['score']:.2f}" for r in done))
        if on_example is not None:
            on_example(records)
    return records


def ruler_scores(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, length, method and budget: the mean score over examples with its 95% bootstrap interval.

    Args:
        records: what :func:`ruler_sweep` returns.

    Returns:
        One row per (task, length, method, budget): ``score``, ``score_low``, ``score_high``,
        ``examples``, ``score_by_depth`` ({depth: mean score}, niah and variable tracking),
        ``cache_fraction_of_full`` (mean), and ``skipped`` (how many runs could not happen).
    """
    from metakv_cl.statistics import mean_interval

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["task"], record["length"], record["method"], record["budget"]), []).append(record)
    rows = []
    for (task, length, method, budget), group in groups.items():
        scored = [r for r in group if "score" in r]
        row: dict[str, Any] = {"task": task, "length": length, "method": method, "budget": budget,
                               "examples": len(scored), "skipped": len(group) - len(scored)}
        if scored:
            interval = mean_interval([r["score"] for r in scored])
            depths = sorted({r["depth"] for r in scored if r["depth"] is not None})
            row.update(score=interval.estimate, score_low=interval.low, score_high=interval.high,
                       cache_fraction_of_full=sum(r["cache_fraction_of_full"] for r in scored) / len(scored),
                       score_by_depth={str(d): sum(r["score"] for r in scored if r["depth"] == d)
                                       / sum(r["depth"] == d for r in scored) for d in depths})
        rows.append(row)
    return rows


def plot_task_scores(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """A heatmap of mean scores: one line per task and length, one column per method and budget."""
    from metakv_cl.plotting import new_figure, save_figure

    done = [r for r in rows if "score" in r]
    lines = sorted({(r["task"], r["length"]) for r in done})
    columns = sorted({(r["method"], r["budget"]) for r in done}, key=lambda mb: (mb[0] != "full", mb[0], -mb[1]))
    grid = torch.full((len(lines), len(columns)), float("nan"))
    for r in done:
        grid[lines.index((r["task"], r["length"])), columns.index((r["method"], r["budget"]))] = r["score"]
    figure = new_figure(figsize=(1.1 * len(columns) + 3.5, 0.5 * len(lines) + 2.2), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for line in range(len(lines)):
        for column in range(len(columns)):
            value = float(grid[line, column])
            if not math.isnan(value):
                axis.text(column, line, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axis.set_xticks(range(len(columns)), [f"{m}\n@ {b:g}" for m, b in columns], fontsize=7)
    axis.set_yticks(range(len(lines)), [f"{t} ({n})" for t, n in lines], fontsize=7)
    figure.colorbar(image, ax=axis, shrink=0.8, label="mean score")
    axis.set_title(title, fontsize=9)
    save_figure(figure, path)


# --- command lines ---------------------------------------------------------------------------
def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def _settings(args: argparse.Namespace) -> RunSettings:
    return RunSettings(args.chunk_size, args.headroom, args.reference_queries, args.repeat_queries,
                       parse_method_options(args.method_option))


def _write(out_dir: Path, name: str, config: dict[str, Any], rows: list[dict[str, Any]], **more: Any) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"config": config, "results": rows, **more}, indent=2, default=str))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``metakv-cl kv-eval``: perplexity of long-text continuations against cache size.

    Returns:
        The exit status (0 on success).
    """
    parser = kv_eval_parser()
    args = _parse(parser, argv)
    try:
        methods, budgets = _methods(args.methods), _budgets(args.budgets)
        if args.articles < 1 or args.context < 1 or args.continuation < 1 or args.skip_articles < 0:
            raise ValueError("--articles, --context and --continuation must be >= 1 and --skip-articles >= 0")
        model, tokenizer = _model(args)
        protocols = _protocols(args.protocol)
        articles = long_articles(args.data_root)
        windows = article_windows(tokenizer, articles, args.context + args.continuation, args.articles, args.skip_articles)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    config = {**vars(args), "methods": methods, "budgets": budgets, "protocols": protocols,
              "model_class": type(model).__name__}
    rows: list[dict[str, Any]] = []
    for protocol in protocols:
        done = list(rows)
        rows = done + perplexity_sweep(
            model, windows, args.context, methods, budgets, _settings(args), protocol=protocol,
            on_row=lambda partial: _write(args.out_dir, "kv_eval", config, done + partial),
        )
    path = _write(args.out_dir, "kv_eval", config, rows)
    source = "WikiText-2" if args.data_root is None else Path(args.data_root).name
    title = f"{args.model}: {args.articles} {source} articles, {args.context}-token context, {' and '.join(protocols)}"
    plot_perplexity(rows, args.out_dir / "kv_eval.png", title)
    print(f"wrote {path} and {args.out_dir / 'kv_eval.png'}")
    return 0


def niah_main(argv: Sequence[str] | None = None) -> int:
    """``metakv-cl niah``: needle-in-a-haystack retrieval through compacted caches.

    Returns:
        The exit status (0 on success).
    """
    parser = niah_parser()
    args = _parse(parser, argv)
    try:
        methods, budgets = _methods(args.methods), _budgets(args.budgets)
        lengths = _numbers(args.lengths, "--lengths", int)
        depths = _numbers(args.depths, "--depths", float)
        if any(not 0 <= d <= 1 for d in depths) or any(n < 8 for n in lengths) or args.samples < 1:
            raise ValueError("depths must be in [0, 1], lengths >= 8 and samples >= 1")
        model, tokenizer = _model(args)
        articles = long_articles(args.data_root)
        haystack = tokenizer("\n".join(articles), add_special_tokens=False)["input_ids"]
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    rows = needle_sweep(model, tokenizer, haystack, methods, budgets, lengths, depths, args.samples, _settings(args), args.seed)
    config = {**vars(args), "methods": methods, "budgets": budgets, "lengths": lengths, "depths": depths}
    path = _write(args.out_dir, "niah", config, rows)
    plot_needle(rows, args.out_dir / "niah.png", f"{args.model}: needle retrieval by haystack length and depth")
    print(f"wrote {path} and {args.out_dir / 'niah.png'}")
    return 0


def compaction_setting(question_aware: bool) -> str:
    """How a RULER run compacted, in the words of its pages and plots."""
    return "question-aware" if question_aware else "question-agnostic"


def ruler_markdown(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    """A results page of :func:`ruler_scores` rows: the command, then one table row per method and
    budget, one column per task and length, each cell the mean score and its 95% interval."""
    columns = sorted({(r["task"], r["length"]) for r in rows}, key=lambda c: (c[1], TASKS.index(c[0])))
    arms = sorted({(r["method"], r["budget"]) for r in rows}, key=lambda a: (a[0] != "full", -a[1], a[0]))
    cells = {(r["method"], r["budget"], r["task"], r["length"]): r for r in rows}

    def cell(arm, column) -> str:
        row = cells.get((*arm, *column))
        if row is None or "score" not in row:
            return "—"
        return f"{row['score']:.2f} [{row['score_low']:.2f}, {row['score_high']:.2f}]"

    lines = [f"# RULER-style scores, one-shot {compaction_setting(config.get('question_aware', False))} compaction", "", "```bash", config["command"], "```", "",
             "Mean score over examples [95% bootstrap interval]; `full` is the uncompacted cache.", "",
             "| method | budget | " + " | ".join(f"{task} @ {length}" for task, length in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    lines += [f"| {method} | {budget:g} | " + " | ".join(cell((method, budget), c) for c in columns) + " |"
              for method, budget in arms]
    return "\n".join(lines) + "\n"


def ruler_main(argv: Sequence[str] | None = None) -> int:
    """``metakv-cl ruler``: RULER-style task accuracy through one-shot compacted caches.

    Returns:
        The exit status (0 on success).
    """
    parser = ruler_parser()
    args = _parse(parser, argv)
    try:
        methods, budgets = _methods(args.methods), _budgets(args.budgets)
        tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown task {unknown[0] if unknown else args.tasks!r} in --tasks; choose from {', '.join(TASKS)} or all")
        lengths = _numbers(args.lengths, "--lengths", int)
        depths = _numbers(args.depths, "--depths", float)
        if any(not 0 <= d <= 1 for d in depths) or args.examples < 1:
            raise ValueError("--depths must be in [0, 1] and --examples >= 1")
        model, tokenizer = _model(args)
        generator = ruler_generator(tokenizer, long_articles(args.data_root))
        examples = [example for task in tasks for length in lengths
                    for example in generator.examples(task, length, args.examples, args.seed, depths)]
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    config = {**vars(args), "methods": methods, "budgets": budgets, "tasks": tasks, "lengths": lengths, "depths": depths,
              "command": "metakv-cl ruler " + " ".join(sys.argv[1:] if argv is None else argv)}

    def save(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write ``ruler.json`` (the scores so far and every answer); returns the scores."""
        scores = ruler_scores(records)
        _write(args.out_dir, "ruler", config, scores, examples=records)
        return scores

    records = ruler_sweep(model, tokenizer, examples, methods, budgets, _settings(args), on_example=save,
                          question_aware=args.question_aware)
    scores = save(records)
    plot_task_scores(scores, args.out_dir / "ruler.png", f"{args.model}: RULER-style tasks, one-shot "
                     f"{compaction_setting(args.question_aware)} compaction ({args.examples} examples per task)")
    (args.out_dir / "ruler.md").write_text(ruler_markdown(scores, config))
    print(f"wrote ruler.json, ruler.md and ruler.png in {args.out_dir}")
    return 0
