"""Joint training on every experience at once: the upper reference of a comparison.

The model is trained once on the union of all experiences' training data (as Avalanche's
``JointTraining``). In the report its matrix repeats the final evaluation in every row after
row 0, since one model stands for all of them: forgetting and BWT are 0 by construction and the
"FWT" column only shows the gain over the untrained model.
"""

from __future__ import annotations

from typing import Any, Sequence

import metakv_cl  # noqa: F401  (torchvision import fix before avalanche loads)
from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience

from metakv_cl.data.stream import concat_experience_datasets
from metakv_cl.strategies.base import ContinualStrategy


class JointTraining(ContinualStrategy):
    """Train on all experiences together (call :meth:`train_jointly`, or ``train`` with a list).

    Takes the arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy` (its plugins included).
    """

    strategy_name = "joint"
    trains_jointly = True

    def train(self, experiences, eval_streams=None, **kwargs: Any):
        """Train once on the union of ``experiences`` (one experience or a sequence)."""
        experiences = [experiences] if hasattr(experiences, "dataset") else list(experiences)
        return self.train_jointly(experiences, **kwargs)

    def train_jointly(self, experiences: Sequence[DatasetExperience], **kwargs: Any) -> None:
        """One fit on the concatenated training data of ``experiences``."""
        if not experiences:
            raise ValueError("joint training needs at least one experience")
        merged = DatasetExperience(
            dataset=concat_experience_datasets(e.dataset for e in experiences),
            current_experience=int(experiences[-1].current_experience),
        )
        self._joint_count = len(experiences)
        super().train(merged, eval_streams=[], **kwargs)
        self.trained_experiences = int(experiences[-1].current_experience) + 1

    def stage_for(self, index: int) -> str:
        return "joint"

    def experience_label(self, index: int | None = None) -> str:
        if self.stage == "joint" and index is None:
            return f"joint training on {getattr(self, '_joint_count', '?')} experiences"
        return super().experience_label(index)
