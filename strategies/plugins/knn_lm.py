"""kNN-LM as a continual-learning method: every experience's training text goes to a datastore.

Khandelwal et al., "Generalization through Memorization: Nearest Neighbor Language Models"
(ICLR 2020), on :class:`metakv_cl.kv.retrieval.knn_lm.KNNLM`. After each experience's training,
every context of the experience's own training documents (the model's final hidden state, as the
model is then) is stored with the token that followed it; nothing stored is ever overwritten, so
what an experience taught cannot be forgotten by the store. Language-modelling experiences are
then scored with ``lambda * p_kNN + (1 - lambda) * p_LM`` instead of the plain LM, through the
module's :attr:`~metakv_cl.training.ContinualLMModule.eval_scorer`.

The base model trains as in Naive, or stays frozen (``freeze_base``: no fit at all, the
datastore is the whole method). When it trains, the keys of earlier experiences were computed by
earlier weights and are not recomputed (as in the paper's fine-tuned setting they go stale).

Classification streams are refused: their evaluation ranks label strings by likelihood and
would not read the datastore, so the method would report Naive's accuracies under its own name
(retrieval-augmented classification is a separate method).

The datastore's size (entries and bytes of keys and next tokens) is the method's memory in the
report's ``extra``: ``knn_lm_entries`` and ``knn_lm_bytes``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from metakv_cl.data.collate import IGNORE_INDEX
from metakv_cl.data.stream import is_classification_item
from metakv_cl.strategies.plugins.base import MethodPlugin


class KNNLM(MethodPlugin):
    """kNN-LM over a datastore of every experience's training contexts.

    Args:
        interpolation: lambda in [0, 1], the weight of p_kNN (0: the plain LM).
        temperature: divides the negative squared L2 distances before the softmax (> 0).
        k: neighbours per prediction.
        freeze_base: keep the base model frozen: no training phase, only the datastore grows.
        index: datastore index kind, ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``
            (:class:`~metakv_cl.kv.retrieval.datastore.Datastore`).
        window: tokens per forward call when storing a document (default: the model's position limit).

    Raises:
        ValueError: a window below 2 tokens; settings out of range (when the strategy is built: the
            datastore checks them).
    """

    # the module has one eval_scorer slot: two plugins scoring evaluation would overwrite each other
    exclusive = ("evaluation scorer",)

    def __init__(
        self,
        interpolation: float = 0.25,
        temperature: float = 1.0,
        k: int = 16,
        freeze_base: bool = False,
        index: Literal["flat", "ivf", "hnsw"] = "flat",
        window: int | None = None,
    ):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 2):
            raise ValueError(f"window: {window!r} is not a token count; give an integer >= 2 (a context and its "
                             "next token), or None for the model's position limit")
        super().__init__()
        self.interpolation, self.temperature, self.k = interpolation, temperature, k
        self.freeze_base, self.index, self.window = freeze_base, index, window
        # a frozen base replaces the one "train" fit by no fit: it owns the (empty) schedule, so a
        # second schedule owner (Meta-KV consolidation) is refused by check_conflicts
        self.owns_training = freeze_base
        self.memory = None  # the retrieval KNNLM, built by attach (its dimension is the model's)

    @property
    def method_name(self) -> str:
        return "knn-lm-frozen" if self.freeze_base else "knn-lm"

    def attach(self, strategy) -> None:
        # imported here: FAISS is the optional extra "retrieval", needed by this method only
        from metakv_cl.kv.retrieval.datastore import Datastore
        from metakv_cl.kv.retrieval.knn_lm import KNNLM as Memory

        head = strategy.module.model.get_output_embeddings()
        if head is None:
            raise ValueError("KNNLM needs a model with an output layer (get_output_embeddings() is None)")
        store = Datastore(head.weight.shape[-1], metric="l2", index=self.index, seed=strategy.seed)
        self.memory = Memory(store, torch.empty(0, dtype=torch.long), interpolation=self.interpolation,
                             temperature=self.temperature, k=self.k)

    def train_experience(self, strategy) -> None:
        """A frozen base has no training phase (only called when ``freeze_base``)."""

    def before_training_exp(self, strategy, **kwargs: Any) -> None:
        _refuse_classification(strategy.experience.dataset[0])

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs: Any) -> None:
        model = strategy.module.model
        # the experience's own documents (never a replay buffer's, which are stored already)
        documents = [item["input_ids"] for item in strategy.experience.dataset]
        was_training = model.training
        model.eval()  # keys without dropout, as evaluation queries them
        try:
            self.memory.add_corpus(model, documents, window=self.window or strategy.module.max_positions or 512)
        finally:
            model.train(was_training)

    def before_eval_exp(self, strategy, **kwargs: Any) -> None:
        _refuse_classification(strategy.experience.dataset[0])
        if len(self.memory.datastore):  # nothing stored yet (the initial row): the plain LM
            strategy.module.eval_scorer = self.score

    def after_eval_exp(self, strategy, **kwargs: Any) -> None:
        strategy.module.eval_scorer = None

    def score(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The kNN-LM next-token log-probabilities of a language-modelling batch.

        Args:
            model: the causal LM.
            batch: ``input_ids``, ``attention_mask`` and ``labels`` [batch, length].

        Returns:
            [batch, length, vocab] float32 log-probabilities; the datastore is searched only at the
            positions whose next token is scored (the others keep the LM's, which carry no loss).
        """
        from metakv_cl.kv.retrieval.knn_lm import FinalHiddenStates

        with FinalHiddenStates(model) as captured:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scored = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        mixed = torch.log_softmax(logits.float(), dim=-1)
        mixed[:, :-1][scored] = self.memory.log_probs(captured.latest[:, :-1][scored], logits[:, :-1][scored])
        return mixed

    def report_extra(self, strategy) -> dict[str, Any]:
        return {"knn_lm_entries": len(self.memory.datastore), "knn_lm_bytes": self.memory.nbytes}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from metakv_cl.kv.retrieval.knn_lm import KNNLM as Memory

        self.memory = Memory.from_state_dict(state["memory"])


def _refuse_classification(item: dict) -> None:
    """Raise for a classification item (:func:`~metakv_cl.data.stream.is_classification_item`)."""
    if is_classification_item(item):
        raise ValueError(
            "KNNLM scores language-modelling experiences only: a classification experience is ranked by label "
            "likelihood, which does not read the datastore (retrieval-augmented classification is not this method)"
        )
