"""Task streams: task specifications, loaders, and their Avalanche benchmarks.

Loaders return task lists (:class:`TextTask` / :class:`ClassificationTask`);
:func:`make_benchmark` (or a configured :class:`TaskStream`) turns them into an Avalanche
benchmark of tokenised experiences.
"""

from metakv_cl.data.collate import IGNORE_INDEX, PadCollator
from metakv_cl.data.dbpedia import dbpedia_topic_tasks
from metakv_cl.data.downstream import downstream_tasks
from metakv_cl.data.registry import get_loader, register_loader, registered_loaders
from metakv_cl.data.scoring import rank_choices, rank_choices_with_shared_prompt, sequence_nll
from metakv_cl.data.stream import (
    OVERFLOW_POLICIES,
    CompactVocabulary,
    ExperienceInfo,
    LMBenchmark,
    TaskStream,
    classification_task_from_hf_dataset,
    concat_experience_datasets,
    make_benchmark,
    text_task_from_files,
    text_task_from_hf_dataset,
    word_level_tokenizer,
)
from metakv_cl.data.synthetic import synthetic_topic_tasks
from metakv_cl.data.tasks import ClassificationTask, Task, TextTask
from metakv_cl.data.wikipedia_dump import tasks_from_wikipedia_dump
from metakv_cl.data.wikitext import wikitext_tasks

__all__ = [
    "IGNORE_INDEX",
    "OVERFLOW_POLICIES",
    "ClassificationTask",
    "CompactVocabulary",
    "ExperienceInfo",
    "LMBenchmark",
    "PadCollator",
    "Task",
    "TaskStream",
    "TextTask",
    "classification_task_from_hf_dataset",
    "concat_experience_datasets",
    "dbpedia_topic_tasks",
    "downstream_tasks",
    "get_loader",
    "make_benchmark",
    "rank_choices",
    "register_loader",
    "registered_loaders",
    "rank_choices_with_shared_prompt",
    "sequence_nll",
    "synthetic_topic_tasks",
    "tasks_from_wikipedia_dump",
    "text_task_from_files",
    "text_task_from_hf_dataset",
    "wikitext_tasks",
    "word_level_tokenizer",
]
