"""Dynamic Meta-KV on long context (issue 5): perplexity by position in long WikiText-2 articles.

Variants, all from the same base model:

* ``plain``: the model as loaded, not fine-tuned;
* ``meta-kv-SOURCE`` for each dynamic source of ``--sources`` (mean, attentive, recurrent): the
  base frozen (``freeze_base``), Meta-KV trained;
* ``lora``: peft LoRA on the frozen base.

Equal trainable parameters: the first source at ``--state-dim`` sets the budget; every other
source gets the state dimension whose parameter count is closest to it, and LoRA the rank and
target modules (``LORA_TARGET_SETS``) whose count is closest. Both modulations use the same
scale (``--modulation-scale``: Meta-KV's alpha, LoRA's ``lora_alpha / r``).

Data: the WikiText-2 validation articles. ``--held-out`` articles with at least as many tokens
as the last edge of ``--buckets`` (the evaluated length) are held out (seeded choice); the others
are concatenated and the adapters train on random ``--window``-token windows of them
(Lightning, bf16 autocast on GPU).

Measurements on the first evaluated-length tokens of every held-out article:

* perplexity by position bucket (``--buckets``: token t, predicted from tokens < t, falls in the
  bucket [a, b) with a <= t < b) with the full context (one forward pass);
* the same through a compacted KV cache, for each method of ``--kv-methods`` at ``--kv-budget``
  tokens: the buckets are read one after another into one cache with ``stream_log_likelihood``
  (chunks of ``--kv-chunk`` tokens), the first token of each bucket scored from the last logits
  of the one before;
* mean attention entropy per layer (eager attention, ``--entropy-articles`` held-out articles
  of ``--entropy-tokens`` tokens; nats, averaged over heads and query positions).

Before training, each adapted model must compute what the plain model computes (Meta-KV's and
LoRA's B start at zero): the script raises if the logits differ.

Outputs in ``--out-dir``: ``long_context.json`` (everything, with command, commit, GPU, date),
``long_context.md`` (tables), ``long_context_perplexity.png``, ``long_context_entropy.png``,
``variants/NAME.json`` and ``logs/NAME.log`` (one per variant).

GPU (one process per variant, run side by side on the one GPU; about 4 minutes on an H100)::

    HF_HUB_OFFLINE=1 python benchmarks/long_context.py --out-dir benchmarks/results/long_context --parallel 5

CPU smoke run: ``--model tiny-llama`` (a tiny random Llama reading UTF-8 bytes) with a small
``--wikitext`` file and small sizes (see tests/benchmarks/test_long_context.py).
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import metakv_cl  # noqa: F401  (the torchvision import fix must run before transformers' models)
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

SMOLLM2 = "smollm2"
TINY_LLAMA = "tiny-llama"
MODELS = (SMOLLM2, TINY_LLAMA)
# LoRA target module sets tried for the parameter match, in order of preference on ties.
LORA_TARGET_SETS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("k_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
EXACTNESS_TOLERANCE = 1e-5  # max |logit difference| allowed between the adapted and the plain model at step 0
EXACTNESS_PROBE_TOKENS = 256
RESULT_NAME = "long_context"


@dataclass(frozen=True)
class Variant:
    """One model variant: ``kind`` is ``"plain"``, ``"meta-kv"`` or ``"lora"``; ``source`` the meta-state source."""

    name: str
    kind: str
    source: str | None = None


def variants_for(sources: Sequence[str]) -> list[Variant]:
    """plain, one Meta-KV variant per source, and LoRA."""
    return [Variant("plain", "plain"), *(Variant(f"meta-kv-{s}", "meta-kv", s) for s in sources), Variant("lora", "lora")]


# --- model and data --------------------------------------------------------------------------
def load_base(name: str, device: str) -> tuple[nn.Module, Callable[[str], list[int]]]:
    """The base model (eval mode, on ``device``) and a text -> token ids function.

    Args:
        name: ``smollm2`` (SmolLM2-135M from the offline GGUF) or ``tiny-llama`` (a 2-layer
            random Llama of :mod:`metakv_cl.testing` whose tokens are UTF-8 bytes modulo its vocabulary).
        device: torch device.
    """
    if name == SMOLLM2:
        from metakv_cl.kv.evaluate import SMOLLM2 as EVALUATE_SMOLLM2
        from metakv_cl.kv.evaluate import load_model

        model, tokenizer = load_model(EVALUATE_SMOLLM2, device=device)
        return model, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    if name == TINY_LLAMA:
        from metakv_cl.testing import VOCAB, tiny_llama

        return tiny_llama().to(device), lambda text: [byte % VOCAB for byte in text.encode("utf-8")]
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


@dataclass
class ArticleSplit:
    """Training token stream and held-out evaluation windows.

    Attributes:
        train_tokens: the training articles' tokens, concatenated [tokens].
        held_out: the first ``eval_tokens`` tokens of each held-out article [articles, eval_tokens].
        train_titles, held_out_titles: article titles (their first line).
    """

    train_tokens: torch.Tensor
    held_out: torch.Tensor
    train_titles: list[str]
    held_out_titles: list[str]


def split_articles(articles: Sequence[str], encode: Callable[[str], list[int]], eval_tokens: int, held_out: int,
                   seed: int) -> ArticleSplit:
    """Hold out ``held_out`` articles (a seeded choice among those with ``eval_tokens`` tokens); train on the rest.

    Raises:
        ValueError: too few long articles, or nothing left to train on.
    """
    token_lists = [encode(article) for article in articles]
    long_enough = [i for i, ids in enumerate(token_lists) if len(ids) >= eval_tokens]
    if held_out < 1 or len(long_enough) < held_out:
        raise ValueError(
            f"{len(long_enough)} of {len(articles)} articles have {eval_tokens} tokens, cannot hold out {held_out} "
            "(lower --held-out or --buckets' last edge)"
        )
    if len(articles) == held_out:
        raise ValueError(f"holding out {held_out} of {len(articles)} articles leaves none to train on")
    order = torch.randperm(len(long_enough), generator=torch.Generator().manual_seed(seed))
    chosen = sorted(long_enough[int(i)] for i in order[:held_out])
    train = [i for i in range(len(articles)) if i not in chosen]
    titles = [article.strip().splitlines()[0].strip(" =") for article in articles]
    return ArticleSplit(
        train_tokens=torch.tensor([token for i in train for token in token_lists[i]]),
        held_out=torch.tensor([token_lists[i][:eval_tokens] for i in chosen]),
        train_titles=[titles[i] for i in train],
        held_out_titles=[titles[i] for i in chosen],
    )


class RandomWindows(Dataset):
    """``count`` windows of ``length`` tokens at seeded random offsets of a token stream, as LM batches."""

    def __init__(self, tokens: torch.Tensor, length: int, count: int, seed: int):
        if tokens.numel() <= length:
            raise ValueError(f"the training stream has {tokens.numel()} tokens, a window needs more than {length}")
        self.tokens, self.length = tokens, length
        self.offsets = torch.randint(0, tokens.numel() - length + 1, (count,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.tokens[self.offsets[index] : self.offsets[index] + self.length]
        return {"input_ids": window, "attention_mask": torch.ones_like(window), "labels": window}


# --- parameter matching and adapters ---------------------------------------------------------
def meta_kv_config(source: str, state_dim: int, args: argparse.Namespace):
    from metakv_cl.modeling import MetaKVConfig

    return MetaKVConfig(source=source, rank=args.rank, state_dim=state_dim, alpha=args.modulation_scale)


def meta_kv_parameter_count(model: nn.Module, config) -> int:
    """Trainable parameters Meta-KV with ``config`` adds to ``model`` (counted on the meta device)."""
    from metakv_cl.modeling.families import attention_sites
    from metakv_cl.modeling.meta_kv import MetaKV

    adapter, sites = attention_sites(model)
    with torch.device("meta"):
        return sum(p.numel() for p in MetaKV(config, adapter, sites).parameters())


def matched_state_dim(model: nn.Module, source: str, budget: int, args: argparse.Namespace) -> int:
    """The state dimension giving ``source`` the parameter count closest to ``budget`` (counts grow with it)."""
    dims = range(1, 8 * args.state_dim + 1)

    @functools.cache
    def count(state_dim: int) -> int:
        return meta_kv_parameter_count(model, meta_kv_config(source, state_dim, args))

    above = bisect.bisect_left(dims, budget, key=count)  # first dimension reaching the budget
    candidates = dims[max(above - 1, 0) : above + 1]
    return min(candidates, key=lambda state_dim: abs(count(state_dim) - budget))


def lora_parameter_count(model: nn.Module, targets: Sequence[str], rank: int) -> int:
    """LoRA parameters, rank x (in + out) per targeted linear layer."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def matched_lora(model: nn.Module, budget: int) -> tuple[tuple[str, ...], int]:
    """(target modules, rank) whose LoRA parameter count is closest to ``budget``.

    Raises:
        ValueError: if the model has none of the target modules.
    """
    best: tuple[int, tuple[str, ...], int] | None = None
    for targets in LORA_TARGET_SETS:
        per_rank = lora_parameter_count(model, targets, 1)
        if per_rank == 0:
            continue
        rank = max(1, round(budget / per_rank))
        gap = abs(per_rank * rank - budget)
        if best is None or gap < best[0]:
            best = (gap, targets, rank)
    if best is None:
        raise ValueError(f"{type(model).__name__} has none of the LoRA target modules {LORA_TARGET_SETS[-1]}")
    return best[1], best[2]


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapt(model: nn.Module, variant: Variant, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Add the variant's trainable part to ``model`` (base frozen); plain models come back as they are.

    Returns:
        (the model to train, a description: adapter settings and trainable parameter counts).
    """
    if variant.kind == "plain":
        return model, {"trainable_parameters": 0}
    reference = meta_kv_config(args.sources[0], args.state_dim, args)
    budget = meta_kv_parameter_count(model, reference)
    if variant.kind == "meta-kv":
        from metakv_cl.modeling import add_meta_kv, freeze_base

        state_dim = args.state_dim if variant.source == args.sources[0] else matched_state_dim(model, variant.source, budget, args)
        config = meta_kv_config(variant.source, state_dim, args)
        freeze_base(add_meta_kv(model, config))
        info = {"meta_kv": config.to_dict()}
    else:
        from peft import LoraConfig, get_peft_model

        targets, rank = matched_lora(model, budget)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=args.modulation_scale * rank,
                                                 target_modules=list(targets), lora_dropout=0.0))
        info = {"lora": {"rank": rank, "targets": list(targets), "lora_alpha": args.modulation_scale * rank}}
    return model, {**info, "trainable_parameters": trainable_count(model), "parameter_budget": budget}


# --- training --------------------------------------------------------------------------------
class LossHistory(pl.Callback):
    """Records the training loss of every step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train(model: nn.Module, windows: Dataset, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` on ``windows`` with Lightning; the model returns to ``device``, in eval mode.

    Returns:
        Optimizer steps done (fewer than planned if ``--max-train-minutes`` ran out), seconds,
        tokens and the loss of every step.
    """
    from metakv_cl.training.module import ContinualLMModule

    history = LossHistory()
    module = ContinualLMModule(model, lr=args.lr, lr_schedule="cosine", warmup_steps=args.warmup_steps)
    trainer = pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        precision="bf16-mixed" if device.startswith("cuda") else "32-true",
        max_steps=args.steps,
        max_epochs=1,
        max_time=datetime.timedelta(minutes=args.max_train_minutes),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[history],
    )
    model.train()
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(windows, batch_size=args.batch_size))
    seconds = time.perf_counter() - started
    model.to(device).eval()  # Lightning moves the model to the CPU on teardown
    steps = trainer.global_step
    return {"steps": steps, "planned_steps": args.steps, "seconds": seconds,
            "tokens": steps * args.batch_size * args.window, "losses": history.losses}


# --- measurements ----------------------------------------------------------------------------
def autocast_for(device: str):
    """bf16 autocast on GPU, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


@torch.no_grad()
def token_nll(model: nn.Module, ids: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    """Full-context negative log-likelihood of every token from the second on, [articles, tokens - 1]."""
    rows = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        with autocast_for(device):
            logits = model(input_ids=batch).logits
        rows.append(F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none").cpu())
    return torch.cat(rows)


def bucket_rows(nll_sums: Sequence[float], counts: Sequence[int], buckets: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per bucket: its tokens, mean NLL and perplexity, plus an ``all`` row."""
    rows = [{"bucket": f"{a}-{b}", "tokens": n, "nll": s / n, "perplexity": math.exp(s / n)}
            for (a, b), s, n in zip(buckets, nll_sums, counts)]
    total, tokens = sum(nll_sums), sum(counts)
    return rows + [{"bucket": "all", "tokens": tokens, "nll": total / tokens, "perplexity": math.exp(total / tokens)}]


def full_context_buckets(model: nn.Module, ids: torch.Tensor, buckets: Sequence[tuple[int, int]], batch_size: int,
                         device: str) -> list[dict[str, Any]]:
    """Perplexity by position bucket with the whole window as context."""
    nll = token_nll(model, ids, batch_size, device)  # column j scores token j + 1
    spans = [nll[:, max(a, 1) - 1 : b - 1] for a, b in buckets]
    return bucket_rows([float(s.sum()) for s in spans], [s.numel() for s in spans], buckets)


@torch.no_grad()
def compacted_buckets(model: nn.Module, ids: torch.Tensor, buckets: Sequence[tuple[int, int]], method: str,
                      args: argparse.Namespace, device: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Perplexity by position bucket, reading the buckets in order into one compacted cache.

    Returns:
        (bucket rows, the cache's statistics).
    """
    from metakv_cl.kv import CompactedCache, stream_log_likelihood

    cache = CompactedCache(method, args.kv_budget, config=model.config)
    ids = ids.to(device)
    sums, counts, last_logits = [], [], None
    for a, b in buckets:
        with autocast_for(device):
            nll, scored, logits = stream_log_likelihood(model, cache, ids[:, a:b], score_from=1, chunk_size=args.kv_chunk)
        if last_logits is not None:  # token a, predicted by the previous bucket's last token
            log_probs = torch.log_softmax(last_logits.float(), dim=-1)
            nll -= float(log_probs.gather(-1, ids[:, a : a + 1]).sum())
            scored += ids.shape[0]
        sums.append(nll)
        counts.append(scored)
        last_logits = logits
    return bucket_rows(sums, counts, buckets), cache.stats()


@torch.no_grad()
def attention_entropy(model: nn.Module, ids: torch.Tensor, device: str) -> list[float]:
    """Mean attention entropy (nats) per layer over heads and query positions, with eager attention."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with autocast_for(device):
            attentions = model(input_ids=ids.to(device), output_attentions=True).attentions
        entropies = []
        for weights in attentions:
            p = weights.float()
            entropies.append(float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()))
        return entropies
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def check_exactness(model: nn.Module, reference_logits: torch.Tensor, probe: torch.Tensor) -> float:
    """Max |logit difference| between ``model`` and the plain model's ``reference_logits`` on ``probe``.

    Raises:
        AssertionError: if it exceeds EXACTNESS_TOLERANCE (a fresh adapter must change nothing).
    """
    difference = float((model(input_ids=probe).logits - reference_logits).abs().max())
    if difference > EXACTNESS_TOLERANCE:
        raise AssertionError(f"the adapted model differs from the plain model before training by {difference:.3g} "
                             f"(allowed {EXACTNESS_TOLERANCE}): its B matrices must start at zero")
    return difference


def run_variant(variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """Adapt, train and measure one variant.

    Returns:
        The variant's results (see the module docstring).
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    pl.seed_everything(args.seed, workers=True, verbose=False)
    model, encode = load_base(args.model, args.device)
    buckets = bucket_edges(args.buckets)
    split = split_articles(read_articles(args), encode, buckets[-1][1], args.held_out, args.seed)
    lap("load")
    probe = split.held_out[:1, :EXACTNESS_PROBE_TOKENS].to(args.device)
    with torch.no_grad():
        reference_logits = model(input_ids=probe).logits
    model, result = adapt(model, variant, args)
    result = {"variant": variant.name, "kind": variant.kind, "source": variant.source, **result}
    if variant.kind != "plain":
        model.eval()
        result["exactness_max_abs_diff"] = check_exactness(model, reference_logits, probe)
        windows = RandomWindows(split.train_tokens, args.window, args.steps * args.batch_size, args.seed)
        result["training"] = train(model, windows, args, args.device)
        lap("train")
        if variant.kind == "lora":
            model = model.merge_and_unload()  # the same function as plain weights
    entropy_ids = split.held_out[: args.entropy_articles, : args.entropy_tokens]
    result["attention_entropy"] = attention_entropy(model, entropy_ids, args.device)
    lap("entropy")
    result["full_context"] = full_context_buckets(model, split.held_out, buckets, args.eval_batch, args.device)
    lap("full_context")
    result["compacted"], result["cache_stats"] = {}, {}
    for method in args.kv_methods:
        result["compacted"][method], result["cache_stats"][method] = compacted_buckets(
            model, split.held_out, buckets, method, args, args.device)
        lap(f"compacted_{method}")
    if args.device.startswith("cuda"):
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    result["timings"] = timings
    result["split"] = {"train_tokens": split.train_tokens.numel(), "train_articles": len(split.train_titles),
                       "held_out_titles": split.held_out_titles}
    return result


# --- report ----------------------------------------------------------------------------------
def bucket_edges(spec: str) -> list[tuple[int, int]]:
    """``"0,256,512"`` -> ``[(0, 256), (256, 512)]``.

    Raises:
        ValueError: fewer than two edges, or edges not increasing from 0.
    """
    try:
        edges = [int(e) for e in spec.split(",")]
    except ValueError:
        raise ValueError(f"--buckets must be comma-separated integers, got {spec!r}") from None
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--buckets must be at least two increasing token positions starting at 0, got {spec!r}")
    return list(zip(edges, edges[1:]))


def read_articles(args: argparse.Namespace) -> list[str]:
    from metakv_cl.kv.evaluate import default_data_root, wikitext_articles

    return wikitext_articles(args.wikitext or default_data_root() / "wikitext2" / "valid.txt")


def run_metadata(argv: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Command, commit, GPU, date and versions of this run."""
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {
        "command": shlex.join(["python", "benchmarks/long_context.py", *argv]),
        "commit": args.commit or commit,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"none (CPU: {platform.processor() or platform.machine()})",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("only", "commit")},
    }


def _bucket_table(title: str, results: Sequence[dict[str, Any]], rows_of: Callable[[dict], list[dict] | None]) -> list[str]:
    present = [(r["variant"], rows_of(r)) for r in results if rows_of(r)]
    if not present:
        return []
    buckets = [row["bucket"] for row in present[0][1]]
    lines = [f"### {title}", "", "| variant | " + " | ".join(buckets) + " |", "|---|" + "---:|" * len(buckets)]
    lines += [f"| {name} | " + " | ".join(f"{row['perplexity']:.2f}" for row in rows) + " |" for name, rows in present]
    return lines + [""]


def markdown_report(report: dict[str, Any]) -> str:
    """The tables of ``long_context.md``."""
    meta, results, settings = report["meta"], report["variants"], report["meta"]["settings"]
    lines = [
        "# Dynamic Meta-KV on long context (issue 5)", "",
        f"- command: `{meta['command']}`", f"- commit: `{meta['commit']}`", f"- GPU: {meta['gpu']}", f"- date: {meta['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- model: {settings['model']}; training: {settings['steps']} steps x {settings['batch_size']} windows of "
        f"{settings['window']} tokens, lr {settings['lr']} (cosine, {settings['warmup_steps']} warm-up), "
        f"modulation scale {settings['modulation_scale']}; evaluation: {settings['held_out']} held-out articles, "
        f"first {bucket_edges(settings['buckets'])[-1][1]} tokens each", "",
        "### Variants", "",
        "| variant | trainable params | adapter | exact at step 0 (max abs diff) | steps | train s | first loss | last loss |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        adapter = ("-" if r["kind"] == "plain" else
                   f"rank {r['meta_kv']['rank']}, state_dim {r['meta_kv']['state_dim']}" if r["kind"] == "meta-kv" else
                   f"rank {r['lora']['rank']} on {'/'.join(r['lora']['targets'])}")
        training = r.get("training")
        train_cells = (["-"] * 4 if training is None else
                       [str(training["steps"]), f"{training['seconds']:.0f}", f"{training['losses'][0]:.3f}",
                        f"{sum(training['losses'][-10:]) / len(training['losses'][-10:]):.3f} (mean of last 10)"])
        exact = f"{r['exactness_max_abs_diff']:.1e}" if "exactness_max_abs_diff" in r else "-"
        lines.append(f"| {r['variant']} | {r['trainable_parameters']:,} | {adapter} | {exact} | " + " | ".join(train_cells) + " |")
    lines.append("")
    lines += _bucket_table("Held-out perplexity by token position, full context", results, lambda r: r["full_context"])
    for method in settings["kv_methods"]:
        lines += _bucket_table(f"Held-out perplexity by token position, compacted cache: {method}, "
                               f"{settings['kv_budget']} tokens", results, lambda r, m=method: r["compacted"].get(m))
    lines += ["### Mean attention entropy (nats) over layers", "", "| variant | mean | first layer | last layer |",
              "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {sum(e) / len(e):.3f} | {e[0]:.3f} | {e[-1]:.3f} |"
              for r in results for e in [r["attention_entropy"]]]
    if report["errors"]:
        lines += ["", "### Failed variants", ""] + [f"- {name}: {error}" for name, error in report["errors"].items()]
    return "\n".join(lines) + "\n"


def plot_perplexity(results: Sequence[dict[str, Any]], kv_methods: Sequence[str], kv_budget: int, path: Path) -> None:
    """Perplexity by position bucket (top) and its ratio to the plain model's (bottom), one column per
    context (full, each compacted cache), one line per variant."""
    from metakv_cl.plotting import new_figure, save_figure

    panels = [("full context", lambda r: r["full_context"])] + [
        (f"compacted: {m}, {kv_budget} tokens", lambda r, m=m: r["compacted"][m]) for m in kv_methods]
    plain = next((r for r in results if r["kind"] == "plain"), None)
    figure = new_figure(figsize=(5.2 * len(panels), 7.6))
    axes = figure.subplots(2, len(panels), sharex=True, sharey="row", squeeze=False)
    for column, (title, rows_of) in enumerate(panels):
        top, bottom = axes[0][column], axes[1][column]
        baseline = None if plain is None else [row["perplexity"] for row in rows_of(plain) if row["bucket"] != "all"]
        for index, r in enumerate(results):
            rows = [row for row in rows_of(r) if row["bucket"] != "all"]
            values = [row["perplexity"] for row in rows]
            style = {"marker": "os^vDx"[index % 6], "linestyle": "--" if r["kind"] == "plain" else "-", "label": r["variant"]}
            top.plot(range(len(rows)), values, **style)
            if baseline is not None:
                bottom.plot(range(len(rows)), [v / b for v, b in zip(values, baseline)], **style)
        bottom.set_xticks(range(len(rows)), [row["bucket"] for row in rows], rotation=30, fontsize=8)
        bottom.set_xlabel("token position in the article")
        top.set_title(title, fontsize=10)
        for axis in (top, bottom):
            axis.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity")
    axes[1][0].set_ylabel("perplexity / plain model's")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)


def plot_entropy(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean attention entropy per layer (left) and its difference from the plain model's (right), one line per variant."""
    from matplotlib.ticker import MaxNLocator

    from metakv_cl.plotting import new_figure, save_figure

    plain = next((r["attention_entropy"] for r in results if r["kind"] == "plain"), None)
    figure = new_figure(figsize=(12, 4.6))
    left, right = figure.subplots(1, 2, sharex=True)
    for index, r in enumerate(results):
        entropy = r["attention_entropy"]
        style = {"marker": "os^vDx"[index % 6], "markersize": 4, "linestyle": "--" if r["kind"] == "plain" else "-",
                 "label": r["variant"]}
        left.plot(range(len(entropy)), entropy, **style)
        if plain is not None:
            right.plot(range(len(entropy)), [e - p for e, p in zip(entropy, plain)], **style)
    left.set_ylabel("mean attention entropy (nats)")
    right.set_ylabel("entropy - plain model's (nats)")
    for axis in (left, right):
        axis.set_xlabel("layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle("Attention entropy per layer, with and without Meta-KV (held-out text)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)


def write_report(out_dir: Path, variants: Sequence[Variant], meta: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    """Gather the variant files into ``long_context.json``, ``.md`` and the two plots."""
    results = [json.loads((out_dir / "variants" / f"{v.name}.json").read_text())
               for v in variants if (out_dir / "variants" / f"{v.name}.json").is_file()]
    report = {"meta": meta, "variants": results, "errors": errors}
    (out_dir / f"{RESULT_NAME}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{RESULT_NAME}.md").write_text(markdown_report(report))
    if results:
        plot_perplexity(results, meta["settings"]["kv_methods"], meta["settings"]["kv_budget"],
                        out_dir / f"{RESULT_NAME}_perplexity.png")
        plot_entropy(results, out_dir / f"{RESULT_NAME}_entropy.png")
    return report


# --- command line ----------------------------------------------------------------------------
def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    from metakv_cl.kv import available_methods
    from metakv_cl.modeling import DYNAMIC_SOURCES

    parser = argparse.ArgumentParser(description="Dynamic Meta-KV vs LoRA vs plain on long WikiText-2 articles.")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--model", default=SMOLLM2, choices=MODELS)
    parser.add_argument("--wikitext", type=Path, default=None, help="WikiText file (default: the shared wikitext2/valid.txt)")
    parser.add_argument("--sources", default="mean,attentive,recurrent", help="dynamic Meta-KV sources; the first sets the parameter budget")
    parser.add_argument("--rank", type=int, default=8, help="Meta-KV rank")
    parser.add_argument("--state-dim", type=int, default=64, help="state dimension of the first source")
    parser.add_argument("--modulation-scale", type=float, default=1.0, help="Meta-KV alpha and LoRA lora_alpha / r")
    parser.add_argument("--held-out", type=int, default=12, help="held-out articles")
    parser.add_argument("--buckets", default="0,256,512,1024,2048,4096", help="position bucket edges; the last is the evaluated length")
    parser.add_argument("--window", type=int, default=2048, help="training window (tokens)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--max-train-minutes", type=float, default=4.0, help="stop training early past this (steps done are recorded)")
    parser.add_argument("--kv-methods", default="h2o,attention_matching")
    parser.add_argument("--kv-budget", type=int, default=512, help="compacted cache size (tokens)")
    parser.add_argument("--kv-chunk", type=int, default=128, help="tokens per forward call through the compacted cache")
    parser.add_argument("--eval-batch", type=int, default=2, help="articles per full-context forward pass")
    parser.add_argument("--entropy-articles", type=int, default=2)
    parser.add_argument("--entropy-tokens", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=1, help="variants run side by side, one process each (1: in this process)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per variant process")
    parser.add_argument("--only", default=None, help="run this one variant and write variants/NAME.json (no report)")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
        args.kv_methods = [m.strip() for m in args.kv_methods.split(",") if m.strip()]
        unknown = [s for s in args.sources if s not in DYNAMIC_SOURCES] + [m for m in args.kv_methods if m not in available_methods()]
        if unknown or not args.sources:
            raise ValueError(f"unknown or missing sources/methods {unknown}: sources are {', '.join(DYNAMIC_SOURCES)}, "
                             f"methods {', '.join(available_methods())}")
        edges = bucket_edges(args.buckets)
        if args.entropy_tokens > edges[-1][1] or args.entropy_articles > args.held_out:
            raise ValueError("--entropy-tokens/--entropy-articles must fit in the held-out windows")
        names = [v.name for v in variants_for(args.sources)]
        if args.only is not None and args.only not in names:
            raise ValueError(f"--only {args.only!r} is not a variant; variants: {', '.join(names)}")
        for name in ("rank", "state_dim", "held_out", "steps", "batch_size", "window", "parallel", "kv_budget", "kv_chunk",
                     "eval_batch", "entropy_articles", "entropy_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    except ValueError as error:
        parser.error(str(error))
    return args


def run_in_subprocess(variant: Variant, argv: Sequence[str], args: argparse.Namespace) -> str | None:
    """Run one variant as ``python THIS_FILE ARGV --only NAME``; returns None or an error line."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", variant.name, "--parallel", "1",
               "--threads", str(threads)]
    log = args.out_dir / "logs" / f"{variant.name}.log"
    with open(log, "w") as stream:
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
        return f"exit status {code}: {tail[0]} (see logs/{variant.name}.log)"
    return None


def run_here(variant: Variant, args: argparse.Namespace) -> None:
    """Run one variant in this process and write variants/NAME.json."""
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_variant(variant, args)
    (args.out_dir / "variants" / f"{variant.name}.json").write_text(json.dumps(result, indent=2))
    print(f"{variant.name}: " + ", ".join(f"{r['bucket']} {r['perplexity']:.2f}" for r in result["full_context"]), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 if every variant succeeded, 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    variants = variants_for(args.sources)
    for folder in ("variants", "logs"):
        (args.out_dir / folder).mkdir(parents=True, exist_ok=True)
    if args.only is not None:
        run_here(next(v for v in variants if v.name == args.only), args)
        return 0
    for variant in variants:  # results of an earlier run must not pass for this one's
        (args.out_dir / "variants" / f"{variant.name}.json").unlink(missing_ok=True)
    started = time.perf_counter()
    errors: dict[str, str] = {}
    if args.parallel == 1:
        for variant in variants:
            run_here(variant, args)
    else:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            outcomes = pool.map(lambda v: (v.name, run_in_subprocess(v, argv, args)), variants)
            errors = {name: error for name, error in outcomes if error is not None}
    meta = {**run_metadata(argv, args), "wall_seconds": time.perf_counter() - started}
    write_report(args.out_dir, variants, meta, errors)
    print((args.out_dir / f"{RESULT_NAME}.md").read_text())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
