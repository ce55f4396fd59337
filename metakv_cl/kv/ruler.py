"""RULER-style synthetic long-context tasks, generated in code, and their scoring.

After Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
Models?" (2024), the suite that kvpress's leaderboard scores compaction methods on. Five tasks:

* ``niah_single``: one needle, "One of the special magic numbers for {key} is: {value}.", in a
  WikiText haystack; the model must give the value of the key;
* ``niah_multikey``: the same, with three distractor needles of other keys;
* ``niah_multivalue``: four needles of one key with different values; all four are asked for;
* ``variable_tracking``: a chain ``VAR A = 12345. VAR B = VAR A. ...`` of five variables hidden
  in RULER's repeated noise ("The grass is green. The sky is blue. ..."), the task's own
  haystack; every variable holding the value is asked for;
* ``common_words_extraction``: a numbered list of words in which ten words appear
  ``common_frequency`` times and the others three times; the ten common words are asked for.

An example is a context (the task's instruction, then the haystack with the needles), a
question that ends with the start of the answer (RULER's answer prefix, so that a base model
completes it), the gold answers and the needle's depth. Texts are assembled from pieces
(sentences, needles, list entries) tokenized one by one, so the context plus the question is
exactly ``length`` tokens of the model's tokenizer (the word list of
``common_words_extraction`` is shorter by less than one uncommon word's entries: it grows a word
at a time). Needles sit between haystack sentences; the queried needle (the first value, the
first assignment) starts at the sentence boundary nearest its depth, the others at depths drawn
from the example's seed. Everything is deterministic given the seed and the source text.

Scoring is RULER's: the greedy continuation, with control characters turned into newlines and
stripped, is searched (case-insensitively) for each gold answer; ``all`` gives the share of
gold answers found (every task here), ``part`` gives 1 when any is found (RULER's QA tasks).
Scores are in [0, 1] (RULER reports them times 100).

Differences from RULER: WikiText-2 replaces Paul Graham's essays as the haystack, keys are
two WikiText words joined by a hyphen (RULER draws adjective-noun pairs from ``wonderwords``),
no in-context example precedes ``common_words_extraction``, and its common-word frequency shrinks
(down to five) when thirty repeats would fill more than half of a short context.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words_extraction")
METRICS = ("all", "part")

# RULER's filler for the tasks whose haystack is noise (variable tracking).
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the numbers afterwards.\n")
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")
NIAH_MULTIVALUE_QUESTION = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                            "The special magic numbers for {key} mentioned in the provided text are")
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According "
               "to the chain(s) of variable assignment in the text above, {count} variables are assigned the value "
               "{value}, they are:")
CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.\n")
CWE_QUESTION = ("\nQuestion: What are the {count} most common words in the above list? Answer: The top {count} words "
                "that appear most often in the list are:")

MULTI_NEEDLES = 4  # needles of niah_multikey (one queried) and values of niah_multivalue
VT_VARIABLES = 5  # one chain of four hops
CWE_COMMON_WORDS = 10
CWE_COMMON_FREQUENCY = 30
CWE_UNCOMMON_FREQUENCY = 3
CWE_MIN_COMMON_FREQUENCY = 5

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\b[a-z]{4,10}\b")
_CONTROL = re.compile(r"[\x00-\x1f]")


@dataclass(frozen=True)
class RulerExample:
    """One question of a task.

    Attributes:
        task: the task's name (one of :data:`TASKS`).
        index: the example's index within its task (with the seed, what generated it).
        context: the text read into the cache (instruction, haystack, needles).
        question: the text read after the cache is compacted; it ends with the answer prefix.
        context_ids, question_ids: their token ids, what the model reads.
        answers: the gold answers.
        metric: ``"all"`` or ``"part"`` (see :func:`score_prediction`).
        depth: where the queried needle starts, as a fraction of the context's tokens (its
            requested depth); None for ``common_words_extraction``.
        needle_offset: the token index in ``context_ids`` where the queried needle starts
            (None for ``common_words_extraction``).
        answer_tokens: the tokens generated for the answer: those of the gold answers written as
            a comma-separated list, plus eight (RULER generates 30 to 128, longer than its answers;
            fewer keeps CPU runs short, and a continuation that starts with the answers is scored alike).
    """

    task: str
    index: int
    context: str
    question: str
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answers: tuple[str, ...]
    metric: str
    depth: float | None
    needle_offset: int | None
    answer_tokens: int

    @property
    def length(self) -> int:
        """Tokens of context plus question."""
        return len(self.context_ids) + len(self.question_ids)


def score_prediction(prediction: str, answers: Sequence[str], metric: str) -> float:
    """RULER's string match of the gold answers in a prediction.

    Args:
        prediction: the decoded continuation.
        answers: the gold answers.
        metric: ``"all"`` (share of answers found) or ``"part"`` (1 if any answer is found).

    Returns:
        The score in [0, 1].

    Raises:
        ValueError: an unknown metric or no answers.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not answers:
        raise ValueError("score_prediction needs at least one gold answer")
    prediction = _CONTROL.sub("\n", prediction).strip().lower()
    found = [answer.lower() in prediction for answer in answers]
    return sum(found) / len(found) if metric == "all" else float(any(found))


def haystack_sentences(paragraphs: Sequence[str]) -> list[str]:
    """The sentences of some paragraphs (split after ``.``, ``!`` or ``?`` and a space), in order."""
    return [sentence for paragraph in paragraphs for sentence in _SENTENCE_END.split(paragraph.strip()) if sentence]


def vocabulary(paragraphs: Sequence[str]) -> list[str]:
    """The distinct lowercase words of 4 to 10 letters in some paragraphs, in order of first appearance."""
    return list(dict.fromkeys(word for paragraph in paragraphs for word in _WORD.findall(paragraph)))


class RulerGenerator:
    """Makes the examples of every task for one tokenizer and one source text.

    Args:
        tokenizer: the model's tokenizer (a transformers tokenizer).
        sentences: the haystack's sentences (:func:`haystack_sentences` of WikiText paragraphs).
        words: the word pool of keys and word lists (:func:`vocabulary`), at least 100 words.

    Raises:
        ValueError: no sentences, or fewer than 100 words.
    """

    def __init__(self, tokenizer, sentences: Sequence[str], words: Sequence[str]):
        if not sentences:
            raise ValueError("the haystack needs at least one sentence")
        if len(words) < 100:
            raise ValueError(f"the word pool needs at least 100 distinct words, got {len(words)}")
        self.tokenizer = tokenizer
        self.sentences = list(sentences)
        self.words = list(words)
        self._sentence_ids: list[list[int]] | None = None
        self._noise_ids = [self._ids(" " + sentence) for sentence in NOISE]
        self._number_prefix = [0]  # _number_prefix[k]: tokens of the list numbers 1 to k

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def sentence_ids(self) -> list[list[int]]:
        """The token ids of every haystack sentence (with its leading space), tokenized once on first use."""
        if self._sentence_ids is None:
            self._sentence_ids = self.tokenizer([" " + s for s in self.sentences], add_special_tokens=False)["input_ids"]
        return self._sentence_ids

    def examples(self, task: str, length: int, count: int, seed: int = 0,
                 depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> list[RulerExample]:
        """``count`` examples of ``task`` whose context plus question is ``length`` tokens.

        Args:
            task: one of :data:`TASKS`.
            length: target tokens of context plus question.
            count: examples to make.
            seed: the generation seed (example ``i`` of a task depends on the seed, the task and ``i`` only).
            depths: needle depths in [0, 1], example ``i`` taking ``depths[i % len(depths)]``
                (not used by ``common_words_extraction``).

        Returns:
            The examples.

        Raises:
            ValueError: an unknown task, a depth outside [0, 1], ``count`` < 1, no depths, or a
                length too short for the task's fixed text.
        """
        makers: dict[str, Callable[[random.Random, int, float], RulerExample]] = {
            "niah_single": lambda rng, i, depth: self._niah(rng, i, depth, length, task, keys=1, values=1),
            "niah_multikey": lambda rng, i, depth: self._niah(rng, i, depth, length, task, keys=MULTI_NEEDLES, values=1),
            "niah_multivalue": lambda rng, i, depth: self._niah(rng, i, depth, length, task, keys=1, values=MULTI_NEEDLES),
            "variable_tracking": lambda rng, i, depth: self._variable_tracking(rng, i, depth, length),
            "common_words_extraction": lambda rng, i, depth: self._common_words(rng, i, length),
        }
        if task not in makers:
            raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
        if count < 1 or not depths:
            raise ValueError("examples needs count >= 1 and at least one depth")
        if any(not 0 <= d <= 1 for d in depths):
            raise ValueError(f"depths must be in [0, 1], got {list(depths)}")
        return [makers[task](random.Random(f"{seed}:{task}:{i}"), i, float(depths[i % len(depths)])) for i in range(count)]

    # --- the tasks -----------------------------------------------------------------------------
    def _niah(self, rng: random.Random, index: int, depth: float, length: int, task: str, keys: int,
              values: int) -> RulerExample:
        names = [self._key(rng) for _ in range(keys)]
        while len(set(names)) < keys:
            names = [self._key(rng) for _ in range(keys)]
        numbers = rng.sample(range(1_000_000, 10_000_000), keys * values)
        needles = [NIAH_NEEDLE.format(key=names[k], value=numbers[k * values + v]) for k in range(keys) for v in range(values)]
        # the queried needle (key 0, value 0) at the requested depth, the others anywhere
        needle_depths = [depth] + [rng.random() for _ in needles[1:]]
        question = (NIAH_QUESTION if values == 1 else NIAH_MULTIVALUE_QUESTION).format(key=names[0])
        start = rng.randrange(len(self.sentence_ids))
        return self._assemble(task, index, depth, length, NIAH_INSTRUCTION, question, needles, needle_depths,
                              lambda budget: _fill(self.sentence_ids, start, budget),
                              answers=[str(n) for n in numbers[:values]], metric="all")

    def _variable_tracking(self, rng: random.Random, index: int, depth: float, length: int) -> RulerExample:
        names = set()
        while len(names) < VT_VARIABLES:
            names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
        names = sorted(names, key=lambda _: rng.random())
        value = rng.randrange(10_000, 100_000)
        needles = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        # the chain in order: the first assignment at the depth, the hops after it
        needle_depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in needles[1:])
        question = VT_QUESTION.format(value=value, count=VT_VARIABLES)
        return self._assemble("variable_tracking", index, depth, length, VT_INSTRUCTION, question, needles, needle_depths,
                              lambda budget: _fill(self._noise_ids, 0, budget), answers=names, metric="all")

    def _common_words(self, rng: random.Random, index: int, length: int) -> RulerExample:
        instruction = self._ids(CWE_INSTRUCTION)
        question_text = CWE_QUESTION.format(count=CWE_COMMON_WORDS)
        question = self._ids(question_text)
        budget = length - len(instruction) - len(question)
        pool = rng.sample(self.words, min(len(self.words), 2000))
        common, uncommon = pool[:CWE_COMMON_WORDS], pool[CWE_COMMON_WORDS:]
        word_tokens = dict(zip(pool, map(len, self.tokenizer([" " + w for w in pool], add_special_tokens=False)["input_ids"])))
        common_tokens = sum(word_tokens[w] for w in common)
        uncommon_tokens = [0]  # uncommon_tokens[k]: tokens of the first k uncommon words
        for word in uncommon:
            uncommon_tokens.append(uncommon_tokens[-1] + word_tokens[word])

        def list_tokens(frequency: int, uncommon_count: int) -> int:
            entries = CWE_COMMON_WORDS * frequency + CWE_UNCOMMON_FREQUENCY * uncommon_count
            return (self._number_tokens(entries) + frequency * common_tokens
                    + CWE_UNCOMMON_FREQUENCY * uncommon_tokens[uncommon_count])

        frequency = CWE_COMMON_FREQUENCY
        while frequency > CWE_MIN_COMMON_FREQUENCY and list_tokens(frequency, 0) > budget / 2:
            frequency -= 1
        if list_tokens(frequency, 0) > budget:
            raise ValueError(f"length {length} is too short for common_words_extraction")
        uncommon_count = 0
        while uncommon_count < len(uncommon) and list_tokens(frequency, uncommon_count + 1) <= budget:
            uncommon_count += 1
        entries = common * frequency + uncommon[:uncommon_count] * CWE_UNCOMMON_FREQUENCY
        rng.shuffle(entries)
        pieces = [piece for i, word in enumerate(entries, 1) for piece in (f" {i}.", f" {word}")]
        ids = instruction + [t for piece in pieces for t in self._ids(piece)]
        return RulerExample("common_words_extraction", index, CWE_INSTRUCTION + "".join(pieces), question_text,
                            tuple(ids), tuple(question), tuple(common), "all", None, None, self._answer_tokens(common))

    # --- assembly ------------------------------------------------------------------------------
    def _number_tokens(self, entries: int) -> int:
        """Tokens of the list numbers `` 1.`` to `` {entries}.``, each tokenized alone."""
        while len(self._number_prefix) <= entries:
            self._number_prefix.append(self._number_prefix[-1] + len(self._ids(f" {len(self._number_prefix)}.")))
        return self._number_prefix[entries]

    def _answer_tokens(self, answers: Sequence[str]) -> int:
        return len(self._ids(" " + ", ".join(answers))) + 8

    def _key(self, rng: random.Random) -> str:
        return "-".join(rng.sample(self.words, 2))

    def _assemble(self, task: str, index: int, depth: float, length: int, instruction: str, question: str,
                  needles: list[str], needle_depths: list[float], filler: Callable[[int], list[list[int]]],
                  answers: Sequence[str], metric: str) -> RulerExample:
        """Instruction, then the haystack with each needle at the sentence boundary nearest its depth."""
        instruction_ids, question_ids = self._ids(instruction), self._ids(question)
        needle_ids = [self._ids(needle) for needle in needles]
        budget = length - len(instruction_ids) - len(question_ids) - sum(map(len, needle_ids))
        if budget < 1:
            raise ValueError(f"length {length} is too short for {task}'s instruction, needles and question")
        units = filler(budget)
        # token offset (in the haystack) where each unit starts, and the end
        starts = [0]
        for unit in units:
            starts.append(starts[-1] + len(unit))
        # each needle goes before the unit boundary nearest its depth; ties keep the needles' order
        slots = [min(range(len(starts)), key=lambda b: abs(starts[b] - d * budget)) for d in needle_depths]
        order = sorted(range(len(needles)), key=lambda n: (slots[n], n))
        ids, text, offsets = list(instruction_ids), [instruction], {}
        decoded = [self.tokenizer.decode(unit) for unit in units]
        next_unit = 0
        for n in order:
            for u in range(next_unit, slots[n]):
                ids += units[u]
                text.append(decoded[u])
            next_unit = max(next_unit, slots[n])
            offsets[n] = len(ids)
            ids += needle_ids[n]
            text.append(needles[n])
        for u in range(next_unit, len(units)):
            ids += units[u]
            text.append(decoded[u])
        return RulerExample(task, index, "".join(text), question, tuple(ids), tuple(question_ids), tuple(answers),
                            metric, depth, offsets[0], self._answer_tokens(answers))


def _fill(units: Sequence[list[int]], start: int, budget: int) -> list[list[int]]:
    """Units (token lists) from ``start`` on, cycling, until ``budget`` tokens; the last one is cut to fit exactly."""
    taken, total, index = [], 0, start
    while total < budget:
        unit = units[index % len(units)][: budget - total]
        taken.append(unit)
        total += len(unit)
        index += 1
    return taken
