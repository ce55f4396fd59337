"""kNN-LM: the LM's next-token distribution mixed with the next tokens of the nearest stored contexts.

Khandelwal, Levy, Jurafsky, Zettlemoyer, Lewis, "Generalization through Memorization: Nearest
Neighbor Language Models" (ICLR 2020). A datastore maps each context of a corpus, represented by
the LM's final hidden state (the input of its output layer), to the token that followed it. At
each step the k nearest stored contexts (squared L2 distance d) vote for their next tokens with
weights ``softmax(-d / temperature)``, and

    p(y | x) = lambda * p_kNN(y | x) + (1 - lambda) * p_LM(y | x).

:class:`KNNLM` holds the datastore and computes the mixture; :meth:`KNNLM.logits_processor` plugs
it into ``model.generate()`` and :func:`knn_lm_log_likelihood` scores a text with it (the
perplexity evaluation), read chunk by chunk through any :class:`~metakv_cl.kv.cache.CompactedCache`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessor

from metakv_cl.kv.attention import enable_compacted_attention
from metakv_cl.kv.cache import CompactedCache
from metakv_cl.kv.retrieval.datastore import Datastore
from metakv_cl.transformers_api import with_cache

SETTINGS_FILE = "knn_lm.json"
TOKENS_FILE = "next_tokens.safetensors"
STORE_DIRECTORY = "datastore"


class FinalHiddenStates:
    """Captures the input of a model's output layer (its final hidden states) on every forward call.

    A context manager: the hook lives between ``__enter__`` and ``__exit__``.

    Args:
        model: a causal LM with ``get_output_embeddings()``.

    Attributes:
        latest: the last call's hidden states [batch, positions, hidden] (the positions whose
            logits were computed), or None before the first call.
    """

    def __init__(self, model: torch.nn.Module):
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise ValueError(f"{type(model).__name__} has no output layer (get_output_embeddings() is None)")
        self.latest: torch.Tensor | None = None
        self._handle = None

    def _capture(self, module, args) -> None:
        self.latest = args[0].detach()

    def __enter__(self) -> FinalHiddenStates:
        self._handle = self.head.register_forward_pre_hook(self._capture)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


class KNNLM:
    """A kNN-LM datastore and its interpolation with the LM (see the module docstring).

    Args:
        datastore: an L2 :class:`Datastore` of context representations.
        next_tokens: [len(datastore)] the token that followed each stored context.
        interpolation: lambda in [0, 1], the weight of p_kNN.
        temperature: divides the negative distances before the softmax (> 0).
        k: neighbours per prediction.

    Raises:
        ValueError: an inner-product datastore, tokens that do not match its size, or settings
            out of range.
    """

    def __init__(self, datastore: Datastore, next_tokens: torch.Tensor, *, interpolation: float = 0.25,
                 temperature: float = 1.0, k: int = 16):
        if datastore.metric != "l2":
            raise ValueError(f"kNN-LM ranks contexts by L2 distance; the datastore uses metric {datastore.metric!r}")
        if next_tokens.dim() != 1 or next_tokens.shape[0] != len(datastore):
            raise ValueError(f"next_tokens must be [{len(datastore)}] (one per stored context), got {tuple(next_tokens.shape)}")
        if not 0.0 <= interpolation <= 1.0:
            raise ValueError(f"interpolation (lambda) must be in [0, 1], got {interpolation}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.datastore, self.next_tokens = datastore, next_tokens.long().cpu()
        self.interpolation, self.temperature, self.k = float(interpolation), float(temperature), k

    @classmethod
    def from_corpus(cls, model: torch.nn.Module, sequences: Iterable[torch.Tensor], *, window: int = 512,
                    index: str = "flat", seed: int = 0, **settings) -> KNNLM:
        """Build the datastore from token sequences: every context with its next token.

        Args:
            model: the causal LM whose final hidden states represent contexts.
            sequences: 1-D token tensors; each is read in windows of ``window`` tokens.
            window: tokens per forward call (within the model's position limit; the first
                contexts of a window see only that window, as in the paper's fixed-length blocks).
            index: datastore index kind (``flat``, ``ivf`` or ``hnsw``; IVF trains on this corpus).
            seed: datastore seed.
            **settings: ``interpolation``, ``temperature``, ``k``.

        Raises:
            ValueError: no sequence with at least two tokens, or a bad window.
        """
        hidden, next_tokens = corpus_contexts(model, sequences, window)
        store = Datastore(hidden.shape[-1], metric="l2", index=index, seed=seed)
        store.add(hidden)
        return cls(store, next_tokens, **settings)

    def add_corpus(self, model: torch.nn.Module, sequences: Iterable[torch.Tensor], *, window: int = 512) -> int:
        """Add every context of more token sequences (a new experience's data): nothing stored is ever overwritten.

        Args: as :meth:`from_corpus`.

        Returns:
            The number of contexts added.

        Raises:
            ValueError: no sequence with at least two tokens, a bad window, or hidden states
                of another size than the stored ones (another model).
        """
        hidden, next_tokens = corpus_contexts(model, sequences, window)
        self.datastore.add(hidden)
        self.next_tokens = torch.cat([self.next_tokens, next_tokens])
        return next_tokens.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored contexts (float32) and next tokens (int64)."""
        return self.datastore.nbytes + self.next_tokens.nbytes

    def knn_log_probs(self, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """log p_kNN [n, vocab_size] of contexts ``hidden`` [n, dim] (-inf for tokens no neighbour votes for)."""
        result = self.datastore.search(hidden, self.k)
        weights = torch.softmax(-result.scores.double() / self.temperature, dim=-1)
        probs = torch.zeros(hidden.shape[0], vocab_size, dtype=torch.float64)
        probs.scatter_add_(1, self.next_tokens[result.ids], weights)
        return probs.log().to(device=hidden.device, dtype=torch.float32)

    def log_probs(self, hidden: torch.Tensor, lm_logits: torch.Tensor) -> torch.Tensor:
        """The interpolated next-token log-probabilities.

        Args:
            hidden: final hidden states [n, dim].
            lm_logits: the LM's logits for the same positions [n, vocab].

        Returns:
            ``log(lambda * p_kNN + (1 - lambda) * p_LM)`` [n, vocab], float32.
        """
        lm = torch.log_softmax(lm_logits.float(), dim=-1)
        # At lambda = 0 the kNN term is log(0) = -inf everywhere and logsumexp returns p_LM exactly.
        knn = self.knn_log_probs(hidden, lm_logits.shape[-1])
        mixture = torch.stack([knn + torch.log(torch.tensor(self.interpolation)),
                               lm + torch.log(torch.tensor(1.0 - self.interpolation))])
        return torch.logsumexp(mixture, dim=0)

    @contextmanager
    def logits_processor(self, model: torch.nn.Module) -> Iterator[KNNLMLogitsProcessor]:
        """A ``generate()`` logits processor that replaces the scores by the kNN-LM log-probabilities.

        Usage::

            with knn_lm.logits_processor(model) as processor:
                model.generate(ids, logits_processor=LogitsProcessorList([processor]))

        Put it first in the list: later processors (temperature, top-p) then act on the mixture.
        """
        with FinalHiddenStates(model) as captured:
            yield KNNLMLogitsProcessor(self, captured)

    def save(self, directory: str | Path) -> Path:
        """Write the datastore, next tokens and settings to ``directory``; returns it."""
        directory = Path(directory)
        self.datastore.save(directory / STORE_DIRECTORY)
        save_file({"next_tokens": self.next_tokens.contiguous()}, str(directory / TOKENS_FILE))
        settings = {"interpolation": self.interpolation, "temperature": self.temperature, "k": self.k}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        return directory

    def state_dict(self) -> dict[str, Any]:
        """The datastore, next tokens and settings as tensors and plain values (a stream state's format)."""
        return {"datastore": self.datastore.state_dict(), "next_tokens": self.next_tokens,
                "settings": {"interpolation": self.interpolation, "temperature": self.temperature, "k": self.k}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> KNNLM:
        """Rebuild a kNN-LM from :meth:`state_dict` output."""
        return cls(Datastore.from_state_dict(state["datastore"]), state["next_tokens"], **state["settings"])

    @classmethod
    def load(cls, directory: str | Path) -> KNNLM:
        """Read a kNN-LM written by :meth:`save`.

        Raises:
            FileNotFoundError: a missing file.
        """
        directory = Path(directory)
        for name in (TOKENS_FILE, SETTINGS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: not a directory written by KNNLM.save")
        tokens = load_file(str(directory / TOKENS_FILE))["next_tokens"]
        return cls(Datastore.load(directory / STORE_DIRECTORY), tokens, **json.loads((directory / SETTINGS_FILE).read_text()))


@torch.no_grad()
def corpus_contexts(model: torch.nn.Module, sequences: Iterable[torch.Tensor], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every context of ``sequences`` as (final hidden states [n, hidden] float32, next tokens [n]), on the CPU.

    Each 1-D sequence is read in windows of ``window`` tokens that overlap by one, so every token
    but a sequence's first is the next token of one stored context.

    Raises:
        ValueError: a window below 2, or no sequence with at least two tokens.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (a context and its next token), got {window}")
    hidden_rows, token_rows = [], []
    with FinalHiddenStates(model) as captured:
        for sequence in sequences:
            sequence = sequence.reshape(-1)
            for start in range(0, max(sequence.shape[0] - 1, 0), window - 1):
                part = sequence[start : start + window]
                model(input_ids=part.unsqueeze(0).to(model.device), use_cache=False)
                hidden_rows.append(captured.latest[0, :-1].float().cpu())
                token_rows.append(part[1:].cpu())
    if not hidden_rows:
        raise ValueError("a kNN-LM corpus needs at least one sequence of two or more tokens")
    return torch.cat(hidden_rows), torch.cat(token_rows).long()


class KNNLMLogitsProcessor(LogitsProcessor):
    """Turns each decoding step's logits into kNN-LM log-probabilities (built by :meth:`KNNLM.logits_processor`)."""

    def __init__(self, knn_lm: KNNLM, captured: FinalHiddenStates):
        self.knn_lm, self.captured = knn_lm, captured

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.captured.latest is None or self.captured.latest.shape[0] != scores.shape[0]:
            raise RuntimeError("no final hidden states for these scores: use the processor inside KNNLM.logits_processor(model)")
        return self.knn_lm.log_probs(self.captured.latest[:, -1], scores).to(scores.dtype)


@torch.no_grad()
def knn_lm_log_likelihood(model: torch.nn.Module, knn_lm: KNNLM, input_ids: torch.Tensor, *,
                          cache: CompactedCache | None = None, chunk_size: int = 256, score_from: int = 1) -> tuple[float, int]:
    """Score ``input_ids`` under the kNN-LM, read chunk by chunk through ``cache``.

    Args:
        model: the causal LM the datastore was built with.
        knn_lm: the datastore and its interpolation settings.
        input_ids: [batch, tokens].
        cache: the model's cache (a :class:`CompactedCache`; default the full cache).
        chunk_size: tokens per forward call.
        score_from: first token index whose log-likelihood is summed.

    Returns:
        (summed negative log-likelihood, number of scored tokens).

    Raises:
        ValueError: bad inputs, or an input that would run past learned positions.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, tokens] with at least 2 tokens, got {tuple(input_ids.shape)}")
    total = input_ids.shape[1]
    if not 1 <= score_from < total:
        raise ValueError(f"score_from must be in [1, {total - 1}], got {score_from}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cache = CompactedCache("full", config=model.config) if cache is None else cache
    cache.check_position_room(chunk_size, total=total)
    enable_compacted_attention(model)
    nll, scored = 0.0, 0
    with FinalHiddenStates(model) as captured:
        for start in range(0, total, chunk_size):
            chunk = input_ids[:, start : start + chunk_size]
            end = start + chunk.shape[1]
            positions = cache.position_ids(chunk.shape[1], chunk.shape[0], device=chunk.device)
            logits = model(input_ids=chunk, position_ids=positions, use_cache=True, **with_cache(model, cache)).logits
            # Position p predicts token p + 1: mix only the rows whose next token is scored.
            first = max(start, score_from - 1)
            targets = input_ids[:, first + 1 : end + 1]
            if targets.shape[1] == 0:
                continue
            rows = slice(first - start, first - start + targets.shape[1])
            hidden, logits = captured.latest[:, rows], logits[:, rows]
            mixed = knn_lm.log_probs(hidden.reshape(-1, hidden.shape[-1]), logits.reshape(-1, logits.shape[-1]))
            picked = mixed.reshape(*targets.shape, -1).gather(-1, targets.unsqueeze(-1))
            nll -= float(picked.sum())
            scored += picked.numel()
    return nll, scored
