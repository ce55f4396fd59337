"""WikiText-2 as one language-modelling task: general English text to warm up from-scratch models.

A from-scratch model has to learn English before a topic stream can teach it anything topical;
the benchmark suite warms it up on this task (``TaskStream(warmup_loader=...)``) and then runs
the continual stream. Texts are the paragraphs of ``wikitext2/valid.txt`` (61 Good/Featured
Wikipedia articles): heading lines (`` = Title = ``, `` = = Section = = ``) are dropped and
WikiText's tokenisation is undone (``" @-@ "`` -> ``"-"``, ``" , "`` -> ``", "``, ...), so the
text reads like the DBpedia abstracts that follow. ``<unk>`` marks stay (WikiText's rare words).

Data: ``<root>/wikitext2/valid.txt``, ``root`` defaulting to
:func:`metakv_cl.data.dbpedia.default_data_root`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from metakv_cl.data.dbpedia import default_data_root, split_holdout
from metakv_cl.data.registry import register_loader
from metakv_cl.data.tasks import TextTask
from metakv_cl.files import read_text

__all__ = ["detokenize_wikitext", "wikitext_paragraphs", "wikitext_tasks"]

_HEADING = re.compile(r"^\s*=.*=\s*$")
# (pattern, replacement) in order: number separators, then spacing around punctuation.
_DETOKENIZE = (
    (re.compile(r" @([-.,])@ "), r"\1"),
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" ('s|'re|'ve|'ll|'d|n't)\b"), r"\1"),
)


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's space-separated tokenisation (``"a @-@ b , c ."`` -> ``"a-b, c."``)."""
    text = text.strip()
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text


def wikitext_paragraphs(path: str | Path) -> list[str]:
    """The detokenised paragraphs of a WikiText file, headings and blank lines dropped.

    Raises:
        FileNotFoundError: the file is missing (the message names it).
        ValueError: the file has no paragraph.
    """
    path = Path(path)
    lines = read_text(path, "WikiText file (see ../shared/data/README.md)").splitlines()
    paragraphs = [detokenize_wikitext(line) for line in lines if line.strip() and not _HEADING.match(line)]
    if not paragraphs:
        raise ValueError(f"{path}: no paragraph found")
    return paragraphs


@register_loader
def wikitext_tasks(
    root: str | Path | None = None,
    name: str = "WikiText-2",
    test_fraction: float = 0.05,
    max_paragraphs: int | None = None,
    seed: int = 0,
) -> list[TextTask]:
    """WikiText-2's validation articles as a single language-modelling task.

    Args:
        root: the data root holding ``wikitext2/valid.txt`` (default: the shared data folder).
        name: the task name.
        test_fraction: share of paragraphs held out.
        max_paragraphs: keep at most this many paragraphs (a seeded random subset; default all).
        seed: seeds the subset and the split.

    Returns:
        ``[TextTask(name, train, test)]`` (a list, as every loader returns).

    Raises:
        FileNotFoundError: the data file is missing. ValueError: bad sizes.
    """
    if max_paragraphs is not None and max_paragraphs < 2:
        raise ValueError(f"max_paragraphs must be at least 2 (a train and a test paragraph) or None, got {max_paragraphs}")
    data_root = Path(root) if root is not None else default_data_root()
    paragraphs = wikitext_paragraphs(data_root / "wikitext2" / "valid.txt")
    if max_paragraphs is not None and max_paragraphs < len(paragraphs):
        paragraphs = random.Random(f"{seed}-wikitext-subset").sample(paragraphs, max_paragraphs)
    train, test = split_holdout(paragraphs, test_fraction, f"{seed}-wikitext", name)
    return [TextTask(name, train=train, test=test)]
