"""Retrieval-augmented classification as a continual-learning method: labelled training items as in-context examples.

After each experience's training, every training item of the experience (its prompt, a space,
its label string and end-of-text, exactly as the stream formats it and the model trained on it)
goes to an :class:`~metakv_cl.kv.retrieval.rag.ExampleStore`, keyed by the embedding of its
prompt alone. At evaluation each test item's prompt retrieves its ``k`` nearest stored items,
from every experience trained so far and only from training items (test items are never
stored), and they are put before its prompt, the nearest one last, next to the prompt (Liu et
al., "What Makes Good In-Context Examples for GPT-3?", DeeLIO 2022). The candidates are then
ranked as usual (shared-prompt scoring, ``ranking``, ``exact_match``), through the module's
:attr:`~metakv_cl.training.ContinualLMModule.eval_context`; per-item outcomes keep their
``index``.

Embedding: the current model's mean-pooled final hidden states of the prompt, unit length,
searched by inner product (:class:`~metakv_cl.kv.retrieval.rag.MeanPooledEmbedder`, as RAG
embeds its chunks). The current model, not a frozen copy of the base: a copy would be a second
model in memory that the method's reported memory leaves out. When the base trains, every stored
key is recomputed by the new weights after each experience (the token ids are stored anyway), so
keys and queries always come from the same weights; with a frozen base the keys never change and
only new items are embedded.

Length: an augmented candidate row holds at most ``max_length`` tokens (default: the model's
position limit). The item's own prompt and candidate are never cut: the examples are, from their
front, so the farthest examples lose tokens first and the nearest one stays whole as long as it fits.

The base model trains as in Naive (on the plain items, without examples), or stays frozen
(``freeze_base``: no fit at all, the datastore is the whole method). Language-modelling streams are
refused: they have no prompt and label to show as an example (kNN-LM is the retrieval method there).

The datastore's size is the method's memory in the report's ``extra``: ``retrieval_icl_entries``
and ``retrieval_icl_bytes`` (keys as float32, token ids and two lengths per entry as int64).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch

from metakv_cl.data.collate import IGNORE_INDEX
from metakv_cl.data.scoring import shared_prompts
from metakv_cl.data.stream import is_classification_item
from metakv_cl.strategies.plugins.base import MethodPlugin


class RetrievedExamples(MethodPlugin):
    """Retrieval-augmented classification over a datastore of every experience's labelled training items.

    Args:
        k: examples retrieved per test item (0: none, the plain method).
        freeze_base: keep the base model frozen: no training phase, only the datastore grows.
        index: datastore index kind, ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``
            (:class:`~metakv_cl.kv.retrieval.datastore.Datastore`).
        max_length: token limit of an augmented candidate row (default: the model's position limit).
        embed_batch_size: prompts per forward call when the datastore embeds stored items.

    Raises:
        ValueError: ``k`` below 0, ``max_length`` below 2 or ``embed_batch_size`` below 1; when the
            strategy is built, a model without an output layer, a ``max_length`` beyond the model's
            position limit, or no limit at all.
    """

    # the module has one eval_context slot: two plugins putting context before prompts would overwrite each other
    exclusive = ("evaluation context",)

    def __init__(
        self,
        k: int = 4,
        freeze_base: bool = False,
        index: Literal["flat", "ivf", "hnsw"] = "flat",
        max_length: int | None = None,
        embed_batch_size: int = 32,
    ):
        _check_count("k", k, least=0)
        if max_length is not None:
            _check_count("max_length", max_length, least=2)
        _check_count("embed_batch_size", embed_batch_size, least=1)
        super().__init__()
        self.k, self.freeze_base, self.index = k, freeze_base, index
        self.max_length, self.embed_batch_size = max_length, embed_batch_size
        # a frozen base replaces the one "train" fit by no fit: it owns the (empty) schedule, so a
        # second schedule owner (Meta-KV consolidation) is refused by check_conflicts
        self.owns_training = freeze_base
        self.store = None  # the ExampleStore, built by attach (its dimension is the model's)
        self.row_limit = 0  # the augmented rows' token limit, set by attach

    @property
    def method_name(self) -> str:
        return "retrieval-icl-frozen" if self.freeze_base else "retrieval-icl"

    def attach(self, strategy) -> None:
        # imported here: FAISS is the optional extra "retrieval", needed by this method only
        from metakv_cl.kv.retrieval.rag import ExampleStore

        head = strategy.module.model.get_output_embeddings()
        if head is None:
            raise ValueError("RetrievedExamples needs a model with an output layer (get_output_embeddings() is None)")
        positions = strategy.module.max_positions
        if self.max_length is not None and positions is not None and self.max_length > positions:
            raise ValueError(f"RetrievedExamples: max_length {self.max_length} exceeds the model's {positions} positions")
        self.row_limit = self.max_length or positions or 0
        if not self.row_limit:
            raise ValueError("RetrievedExamples: the model has no position limit in its config; give max_length")
        self.store = ExampleStore(head.weight.shape[-1], index=self.index, seed=strategy.seed)

    def train_experience(self, strategy) -> None:
        """A frozen base has no training phase (only called when ``freeze_base``)."""

    def before_training_exp(self, strategy, **kwargs: Any) -> None:
        _refuse_language_modelling(strategy.experience.dataset[0])

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs: Any) -> None:
        model = strategy.module.model
        # the experience's own items (never a replay buffer's, which are stored already)
        items = list(strategy.experience.dataset)
        # a training item's labels ignore its prompt: the prompt ends at the first scored token
        scored = [item["labels"] != IGNORE_INDEX for item in items]
        unlabelled = [index for index, tokens in enumerate(scored) if not tokens.any()]
        if unlabelled:
            raise ValueError(f"RetrievedExamples: training item {unlabelled[0]} of {strategy.experience_label()} has no "
                             "scored label token (cut off by max_length?), so its prompt and label cannot be told apart")
        prompt_lengths = [int(tokens.int().argmax()) for tokens in scored]
        was_training = model.training
        model.eval()  # keys without dropout, as evaluation queries them
        try:
            embed = self._embedder(model)
            if not self.freeze_base:
                self.store.reembed(embed)  # the earlier keys came from earlier weights
            self.store.add([item["input_ids"] for item in items], prompt_lengths, embed)
        finally:
            model.train(was_training)

    def before_eval_exp(self, strategy, **kwargs: Any) -> None:
        _refuse_language_modelling(strategy.experience.dataset[0])
        if len(self.store):  # nothing stored yet (the initial row): the plain method
            strategy.module.eval_context = self.prepend_examples

    def after_eval_exp(self, strategy, **kwargs: Any) -> None:
        strategy.module.eval_context = None

    def prepend_examples(self, model: torch.nn.Module, batch: dict) -> dict:
        """A classification batch with each item's retrieved examples before every one of its candidate rows.

        Args:
            model: the causal LM (it embeds the prompts, the queries).
            batch: ``choice_input_ids``, ``choice_labels``, ``choice_attention_mask`` [batch, candidates, length].

        Returns:
            The batch with those three replaced (the examples are unscored context); other keys unchanged.
        """
        choices = (batch["choice_input_ids"], batch["choice_labels"], batch["choice_attention_mask"])
        prompt_ids, _, prompt_lengths, _ = shared_prompts(*choices)
        prompts = [prompt_ids[row, :length] for row, length in enumerate(prompt_lengths.tolist())]
        retrieved = self.store.search(self._embedder(model)(prompts), self.k)
        row_lengths = batch["choice_attention_mask"].sum(dim=-1).amax(dim=-1).tolist()  # each item's longest row
        contexts = [fit_examples(examples, self.row_limit - length) for examples, length in zip(retrieved, row_lengths)]
        return {**batch, **dict(zip(("choice_input_ids", "choice_labels", "choice_attention_mask"),
                                    with_context(*choices, contexts)))}

    def _embedder(self, model: torch.nn.Module) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
        from metakv_cl.kv.retrieval.rag import MeanPooledEmbedder

        embedder, size = MeanPooledEmbedder(model), self.embed_batch_size

        def embed(sequences: Sequence[torch.Tensor]) -> torch.Tensor:
            # in full precision even inside a mixed-precision evaluation: the keys are embedded
            # outside it, and a query should find its near-duplicate whatever the autocast
            with torch.autocast(model.device.type, enabled=False):
                return torch.cat([embedder(sequences[start : start + size]) for start in range(0, len(sequences), size)])

        return embed

    def report_extra(self, strategy) -> dict[str, Any]:
        return {"retrieval_icl_entries": len(self.store), "retrieval_icl_bytes": self.store.nbytes}

    def state_dict(self) -> dict[str, Any]:
        return {"store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from metakv_cl.kv.retrieval.rag import ExampleStore

        self.store = ExampleStore.from_state_dict(state["store"])


def fit_examples(examples: Sequence[torch.Tensor], budget: int) -> torch.Tensor:
    """The context of one item: as many whole examples as fit in ``budget`` tokens, nearest last.

    The farthest examples are dropped whole, so no demonstration starts in the middle of its prompt;
    only when the nearest example alone is longer than the budget is it cut, from the front (its
    label and the end of its prompt stay).

    Args:
        examples: 1-D token ids, nearest first (as retrieved).
        budget: tokens left for context (the limit minus the item's own row; <= 0: none).

    Returns:
        1-D token ids, at most ``max(budget, 0)`` of them.
    """
    if not examples or budget <= 0:
        return torch.empty(0, dtype=torch.long)
    kept, room = [], budget
    for example in examples:
        if len(example) > room:
            break
        kept.append(example)
        room -= len(example)
    if not kept:
        return examples[0][-budget:]
    return torch.cat(list(reversed(kept)))


def with_context(
    choice_input_ids: torch.Tensor, choice_labels: torch.Tensor, choice_attention_mask: torch.Tensor,
    contexts: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate rows with each item's context before them (attended to, not scored).

    Args:
        choice_input_ids: [batch, candidates, length] prompt + candidate tokens, right-padded.
        choice_labels: [batch, candidates, length] the candidate tokens, ``IGNORE_INDEX`` elsewhere.
        choice_attention_mask: [batch, candidates, length].
        contexts: one 1-D token tensor per item (possibly empty).

    Returns:
        The three tensors, [batch, candidates, length + longest context], each item's rows moved
        right by its context's length and right-padded (no context at all: equal to the inputs).
    """
    batch, candidates, length = choice_input_ids.shape
    width = length + max((len(context) for context in contexts), default=0)
    input_ids = choice_input_ids.new_zeros(batch, candidates, width)
    labels = choice_labels.new_full((batch, candidates, width), IGNORE_INDEX)
    mask = choice_attention_mask.new_zeros(batch, candidates, width)
    for item, context in enumerate(contexts):
        start = len(context)
        input_ids[item, :, :start] = context.to(input_ids.device)
        mask[item, :, :start] = 1
        input_ids[item, :, start : start + length] = choice_input_ids[item]
        labels[item, :, start : start + length] = choice_labels[item]
        mask[item, :, start : start + length] = choice_attention_mask[item]
    return input_ids, labels, mask


def _check_count(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}: {value!r} is not an integer >= {least}")


def _refuse_language_modelling(item: dict) -> None:
    """Raise for a language-modelling item (:func:`~metakv_cl.data.stream.is_classification_item`)."""
    if not is_classification_item(item):
        raise ValueError(
            "RetrievedExamples puts labelled training items before classification prompts only: a "
            "language-modelling experience has no prompt and label to show as an example (use KNNLM there)"
        )
