"""A procedurally generated topic stream that needs no download.

Each experience is one *topic family* (fictional people, cities, companies, species,
planets, bands, dishes, ships) with its own freshly generated entities. Every entity gets
one value per relation of its family (a birthplace, a founder, a founding year, ...), so
an experience is a small table of facts. Sentences render those facts through phrasings:

- the **train** split uses the training phrasings of every relation, plus one short
  "profile" line per entity that lists all of its facts;
- the **test** split uses *held-out* phrasings (never seen in training) of the **same**
  facts, with the fact's value at the end of the sentence. A low held-out loss therefore
  needs the model to recall the fact, not just the sentence it was taught.

Names come from random syllables, so they are unknown to any pretrained model, and every
generated value (towns, rivers, people, companies, regions, stars) is fresh for the whole
stream: experiences never share an entity or a generated value, so training one topic can
only help another through shared language, never through shared facts. Values of some
relations come from small fixed pools (professions, colours, ...); those are shared words
but each topic uses its own relations, so the facts still differ.

Everything is deterministic given ``seed``. With the defaults (3 experiences, 8 entities,
4 relations, 5 training and 2 held-out phrasings) each experience has 168 training and 64
test sentences of 6 to 15 words: a tiny GPT-2 learns a topic in seconds on a CPU.

Example:
    >>> tasks = synthetic_topic_tasks(num_experiences=2, entities_per_topic=4, seed=1)
    >>> [task.name for task in tasks]
    ['people', 'cities']
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from metakv_cl.data.registry import register_loader
from metakv_cl.data.tasks import TextTask

__all__ = [
    "TOPIC_FAMILIES",
    "Relation",
    "TopicFamily",
    "SyntheticFact",
    "synthetic_topic_facts",
    "synthetic_topic_tasks",
]


@dataclass(frozen=True)
class Relation:
    """One attribute of a topic family and the ways to say it.

    Args:
        name: relation name, e.g. ``"birthplace"``.
        value_kind: a generated kind (``"town"``, ``"person"``, ``"company"``, ``"river"``,
            ``"region"``, ``"star"``), ``"year:LOW-HIGH"``, ``"count:LOW-HIGH"``, or
            ``"pool:a,b,c"`` for a value drawn from a fixed list.
        train_templates: phrasings used in the train split; ``{e}`` is the entity and
            ``{v}`` the value.
        test_templates: held-out phrasings used only in the test split; they end with
            ``{v}`` so the fact is the last thing the model has to predict.
        profile_label: how the value is named in the entity's profile line.
    """

    name: str
    value_kind: str
    train_templates: tuple[str, ...]
    test_templates: tuple[str, ...]
    profile_label: str


@dataclass(frozen=True)
class TopicFamily:
    """A topic: what its entities are, how they are named and what is known about them.

    Args:
        name: topic (and experience) name.
        entity_kind: the generated kind used to name entities (see :func:`_generate_name`).
        relations: the attributes every entity of the topic has.
    """

    name: str
    entity_kind: str
    relations: tuple[Relation, ...]


@dataclass(frozen=True)
class SyntheticFact:
    """One generated fact: ``relation(entity) = value`` within ``topic``."""

    topic: str
    entity: str
    relation: str
    value: str


def _rel(name: str, value_kind: str, profile_label: str, train: str, test: str) -> Relation:
    """Build a :class:`Relation` from ``" | "``-separated phrasings (keeps the tables compact)."""
    return Relation(
        name=name,
        value_kind=value_kind,
        train_templates=tuple(part.strip() for part in train.split("|")),
        test_templates=tuple(part.strip() for part in test.split("|")),
        profile_label=profile_label,
    )


# The topic families, in the default experience order. Train phrasings vary word order and
# wording; the held-out test phrasings are worded differently again and end with the value.
TOPIC_FAMILIES: tuple[TopicFamily, ...] = (
    TopicFamily("people", "person", (
        _rel("birthplace", "town", "birthplace",
             "{e} was born in {v}. | {e} grew up in the town of {v}. | The hometown of {e} is {v}. "
             "| {v} is where {e} was born. | Everyone knows {e} comes from {v}.",
             "Asked where they were born, {e} answered {v}. | The birthplace of {e} is the town of {v}."),
        _rel("profession", "pool:baker,carpenter,tailor,lawyer,sculptor,nurse,pilot,chemist,librarian,potter",
             "job",
             "{e} works as a {v}. | By profession, {e} is a {v}. | {e} earns a living as a {v}. "
             "| The job of {e} is {v}. | {e} trained for years to become a {v}.",
             "Neighbours of {e} all know that {e} is a {v}. | What does {e} do for work? {e} is a {v}."),
        _rel("employer", "company", "employer",
             "{e} is employed by {v}. | {e} has worked at {v} for a decade. | The employer of {e} is {v}. "
             "| {v} pays the salary of {e}. | Each morning {e} goes to work at {v}.",
             "On weekdays you will find {e} at the offices of {v}. | The company that employs {e} is {v}."),
        _rel("instrument", "pool:cello,flute,harp,drums,accordion,trumpet,banjo,oboe", "instrument",
             "{e} plays the {v}. | In the evenings {e} practises the {v}. | The instrument of {e} is the {v}. "
             "| {e} learned the {v} as a child. | Friends often hear {e} playing the {v}.",
             "At every festival, {e} performs on the {v}. | The musical instrument that {e} plays is the {v}."),
    )),
    TopicFamily("cities", "town", (
        _rel("river", "river", "river",
             "{e} lies on {v}. | {v} flows through {e}. | The river of {e} is {v}. "
             "| Bridges in {e} cross {v}. | Boats on {v} stop at {e}.",
             "The water that runs past the harbour of {e} is {v}. | The river that flows through {e} is {v}."),
        _rel("founder", "person", "founder",
             "{e} was founded by {v}. | {v} founded the city of {e}. | The founder of {e} is {v}. "
             "| A statue of {v}, who founded {e}, stands in the square. | {e} owes its existence to {v}.",
             "Schoolchildren in {e} learn that their city was founded by {v}. "
             "| The person who founded {e} was {v}."),
        _rel("famous_for", "pool:glassware,wool,clocks,cheese,silk,paper,copper bells,pottery", "known for",
             "{e} is famous for its {v}. | Visitors come to {e} to buy {v}. | The best {v} is made in {e}. "
             "| The main craft of {e} is {v}. | Markets in {e} are full of {v}.",
             "Travellers leave {e} with bags full of its famous {v}. | The product {e} is known for is {v}."),
        _rel("region", "region", "region",
             "{e} is a city in {v}. | {e} belongs to the province of {v}. | The region of {e} is {v}. "
             "| The largest city of {v} is {e}. | {e} sits in the hills of {v}.",
             "On a map you will find {e} inside the borders of {v}. | The province that contains {e} is {v}."),
    )),
    TopicFamily("companies", "company", (
        _rel("headquarters", "town", "headquarters",
             "{e} is headquartered in {v}. | The head office of {e} is in {v}. | {e} has its main office in {v}. "
             "| {v} is home to {e}. | The headquarters of {e} stand in {v}.",
             "Letters to the board of {e} are sent to {v}. | The town where {e} has its headquarters is {v}."),
        _rel("founder", "person", "founder",
             "{e} was founded by {v}. | {v} started {e}. | The founder of {e} is {v}. "
             "| {v} created {e} in a small workshop. | {e} began as an idea of {v}.",
             "Every employee of {e} knows the story of its founder, {v}. | The person who founded {e} was {v}."),
        _rel("product", "pool:bicycles,lamps,umbrellas,telescopes,typewriters,kettles,sewing machines,compasses",
             "product",
             "{e} makes {v}. | {e} is known for its {v}. | The main product of {e} is {v}. "
             "| Factories of {e} produce {v}. | Shops sell {v} made by {e}.",
             "Walk into any store of {e} and you will see {v}. | What {e} manufactures is {v}."),
        _rel("founding_year", "year:1820-1990", "founded",
             "{e} was founded in {v}. | {e} opened its doors in {v}. | The founding year of {e} is {v}. "
             "| Since {v}, {e} has been in business. | {e} has existed since {v}.",
             "Old records show that {e} was established in the year {v}. | The year {e} was founded is {v}."),
    )),
    TopicFamily("species", "species", (
        _rel("habitat", "pool:salt marshes,pine forests,limestone caves,mountain lakes,desert dunes,river deltas",
             "habitat",
             "{e} lives in {v}. | {e} is found in {v}. | The habitat of {e} is {v}. "
             "| Biologists study {e} in {v}. | {e} builds its nest in {v}.",
             "To observe {e} in the wild, go to the {v}. | The place where {e} lives is the {v}."),
        _rel("diet", "pool:beetles,seeds,algae,small fish,moss,fruit,snails,nectar", "diet",
             "{e} eats {v}. | {e} feeds mainly on {v}. | The diet of {e} is {v}. "
             "| {e} hunts for {v} at dawn. | {e} survives on {v}.",
             "Keepers at the zoo feed {e} a bowl of {v}. | The food that {e} eats is {v}."),
        _rel("colour", "pool:copper,pale blue,grey,emerald,black,amber,white,crimson", "colour",
             "{e} is {v} in colour. | The feathers of {e} are {v}. | The colour of {e} is {v}. "
             "| The body of {e} is {v}. | You can spot {e} by its {v} colour.",
             "Painters always show {e} as {v}. | The colour that {e} has is {v}."),
        _rel("native_region", "region", "native to",
             "{e} is native to {v}. | {e} comes from {v}. | The native land of {e} is {v}. "
             "| {e} was first described in {v}. | {v} is the home of {e}.",
             "Outside zoos, {e} can only be seen in {v}. | The region {e} is native to is {v}."),
    )),
    TopicFamily("planets", "planet", (
        _rel("star", "star", "star",
             "{e} orbits {v}. | {e} circles the star {v}. | The star of {e} is {v}. "
             "| {v} is the sun of {e}. | {e} travels around {v}.",
             "Seen from {e}, the brightest light in the sky is {v}. | The star that {e} orbits is {v}."),
        _rel("moons", "count:2-14", "moons",
             "{e} has {v} moons. | {v} moons circle {e}. | The number of moons of {e} is {v}. "
             "| Astronomers count {v} moons around {e}. | {e} is orbited by {v} moons.",
             "On a clear night on {e} you can count its moons: there are {v}. "
             "| How many moons does {e} have? It has {v}."),
        _rel("atmosphere", "pool:methane,nitrogen,carbon dioxide,ammonia,neon,sulfur,hydrogen,argon", "atmosphere",
             "{e} has an atmosphere of {v}. | The air of {e} is mostly {v}. | The atmosphere of {e} is {v}. "
             "| Probes found {v} in the sky of {e}. | {e} is wrapped in {v}.",
             "A spacecraft landing on {e} would breathe in {v}. | The gas that fills the sky of {e} is {v}."),
        _rel("discoverer", "person", "discoverer",
             "{e} was discovered by {v}. | {v} discovered {e}. | The discoverer of {e} is {v}. "
             "| {v} first saw {e} through a telescope. | {e} was found by {v}.",
             "Textbooks credit the discovery of {e} to {v}. | The astronomer who discovered {e} was {v}."),
    )),
    TopicFamily("bands", "band", (
        _rel("genre", "pool:jazz,folk,punk,reggae,polka,techno,blues,bluegrass", "genre",
             "{e} plays {v}. | {e} is a {v} band. | The genre of {e} is {v}. "
             "| Fans of {v} love {e}. | {e} records {v} albums.",
             "Radio stations that play {e} list it under {v}. | The kind of music {e} plays is {v}."),
        _rel("hometown", "town", "hometown",
             "{e} formed in {v}. | {e} comes from {v}. | The hometown of {e} is {v}. "
             "| {v} is proud of {e}. | {e} started in a garage in {v}.",
             "Every tour of {e} ends with a concert in {v}. | The town the band {e} comes from is {v}."),
        _rel("singer", "person", "singer",
             "{e} is fronted by {v}. | {v} sings for {e}. | The lead singer of {e} is {v}. "
             "| {v} writes the lyrics for {e}. | The voice of {e} belongs to {v}.",
             "At concerts of {e}, the crowd chants the name of {v}. | The singer of {e} is {v}."),
        _rel("debut_year", "year:1950-2015", "debut",
             "{e} released its first album in {v}. | {e} debuted in {v}. | The debut year of {e} is {v}. "
             "| In {v}, {e} played its first concert. | {e} has made music since {v}.",
             "Critics first wrote about {e} in the year {v}. | The year {e} released its debut album was {v}."),
    )),
    TopicFamily("dishes", "dish", (
        _rel("origin", "region", "origin",
             "{e} comes from {v}. | {e} is a dish from {v}. | The origin of {e} is {v}. "
             "| Cooks in {v} invented {e}. | {e} is the national dish of {v}.",
             "Every grandmother has her own recipe for {e}, the pride of {v}. | The region where {e} was invented is {v}."),
        _rel("ingredient", "pool:lentils,lamb,chestnuts,eel,barley,mushrooms,plums,squid", "ingredient",
             "{e} is made with {v}. | The main ingredient of {e} is {v}. | {e} needs plenty of {v}. "
             "| To cook {e} you first prepare {v}. | {e} tastes of {v}.",
             "If you cook {e}, the one thing you cannot leave out is {v}. | The ingredient at the heart of {e} is {v}."),
        _rel("method", "pool:smoked,fried,baked,steamed,grilled,boiled,roasted", "method",
             "{e} is {v}. | Cooks always serve {e} {v}. | The cooking method for {e} is {v}. "
             "| {e} must be {v} for hours. | Traditionally, {e} is {v}.",
             "Recipes for {e} all agree that it should be {v}. | The way {e} is cooked is {v}."),
        _rel("occasion", "pool:weddings,harvest festivals,funerals,midwinter,birthdays,market days", "eaten at",
             "{e} is eaten at {v}. | Families serve {e} at {v}. | The occasion for {e} is {v}. "
             "| No one celebrates {v} without {e}. | {e} appears on tables at {v}.",
             "People say {e} tastes best at {v}. | The occasion when {e} is served is {v}."),
    )),
    TopicFamily("ships", "ship", (
        _rel("captain", "person", "captain",
             "{e} is commanded by {v}. | {v} captains {e}. | The captain of {e} is {v}. "
             "| {v} stands on the bridge of {e}. | The crew of {e} obeys {v}.",
             "When {e} enters a harbour, the pilot greets its captain, {v}. | The person in command of {e} is {v}."),
        _rel("home_port", "town", "home port",
             "{e} sails from {v}. | {e} is registered in {v}. | The home port of {e} is {v}. "
             "| {e} returns to {v} every winter. | {v} is where {e} docks.",
             "Sailors on {e} always look forward to reaching {v}. | The port {e} calls home is {v}."),
        _rel("launch_year", "year:1700-1900", "launched",
             "{e} was launched in {v}. | {e} first sailed in {v}. | The launch year of {e} is {v}. "
             "| In {v}, {e} left the shipyard. | {e} has sailed since {v}.",
             "The shipyard ledger dates the launch of {e} to the year {v}. | The year {e} was launched is {v}."),
        _rel("cargo", "pool:tea,timber,salt,wool,coffee,iron ore,spices,grain", "cargo",
             "{e} carries {v}. | The holds of {e} are full of {v}. | The cargo of {e} is {v}. "
             "| {e} trades in {v}. | Merchants load {v} onto {e}.",
             "Dockworkers unloading {e} always find {v}. | The cargo that {e} carries is {v}."),
    )),
)

# Syllable parts for fictional names; onset + vowel + coda gives pronounceable nonsense.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t",
           "th", "v", "z", "sh", "c")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "th")

# Suffixes and patterns that make each generated kind recognisable by its form.
_KIND_PATTERNS: dict[str, Callable[[Callable[[int], str], random.Random], str]] = {
    "person": lambda word, rng: f"{word(2)} {word(2)}",
    "town": lambda word, rng: word(2) + rng.choice(("by", "ford", "holm", "wick", "stead", "mere", "ton", "dale")),
    "company": lambda word, rng: f"{word(2)} {rng.choice(('Industries', 'Works', 'Labs', 'Foundry', 'Trading', 'Systems'))}",
    "river": lambda word, rng: f"the {word(2)} River",
    "region": lambda word, rng: word(2) + rng.choice(("ia", "ar", "esh", "mark", "land", "istan")),
    "star": lambda word, rng: f"{word(2)} {rng.choice(('Prime', 'Major', 'Minor', 'Alpha', 'Beta'))}",
    "species": lambda word, rng: f"the {word(2).lower()} {rng.choice(('finch', 'beetle', 'lizard', 'vole', 'heron', 'moth', 'toad', 'otter'))}",
    "planet": lambda word, rng: word(2) + rng.choice(("on", "is", "ara", "ex", "us", "ion")),
    "band": lambda word, rng: f"The {word(2)} {rng.choice(('Brothers', 'Collective', 'Orchestra', 'Ramblers', 'Echoes', 'Lanterns'))}",
    "dish": lambda word, rng: word(2).lower(),
    "ship": lambda word, rng: f"the {rng.choice(('good ship', 'schooner', 'brig', 'steamer'))} {word(2)}",
}


class _NameGenerator:
    """Draws fresh fictional names; no name is returned twice by one generator."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def _word(self, syllables: int) -> str:
        parts = (self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
                 for _ in range(syllables))
        return "".join(parts).capitalize()

    def new(self, kind: str) -> str:
        if kind not in _KIND_PATTERNS:
            raise KeyError(f"unknown generated name kind {kind!r}; known: {sorted(_KIND_PATTERNS)}")
        # The name space is large (about 10^7 per kind), so a handful of retries always suffices.
        for _ in range(1000):
            name = _KIND_PATTERNS[kind](self._word, self._rng)
            if name.lower() not in self._used:
                self._used.add(name.lower())
                return name
        raise RuntimeError(f"could not draw a fresh {kind} name after 1000 tries")


def _draw_value(value_kind: str, names: _NameGenerator, rng: random.Random) -> str:
    """One value of ``value_kind`` (see :class:`Relation`)."""
    kind, _, spec = value_kind.partition(":")
    if kind == "pool":
        return rng.choice(spec.split(","))
    if kind in ("year", "count"):
        low, high = (int(bound) for bound in spec.split("-"))
        return str(rng.randint(low, high))
    return names.new(value_kind)


def _family_by_name(name: str) -> TopicFamily:
    for family in TOPIC_FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"unknown synthetic topic {name!r}; known: {[family.name for family in TOPIC_FAMILIES]}")


def _select_families(num_experiences: int, topics: Sequence[str] | None) -> list[TopicFamily]:
    names = list(topics) if topics is not None else [family.name for family in TOPIC_FAMILIES]
    if len(set(names)) != len(names):
        raise ValueError(f"topics must be distinct, got {names}")
    if not 1 <= num_experiences <= len(names):
        raise ValueError(f"num_experiences must be between 1 and {len(names)} (one topic each), got {num_experiences}")
    return [_family_by_name(name) for name in names[:num_experiences]]


def synthetic_topic_facts(
    num_experiences: int = 3,
    entities_per_topic: int = 8,
    seed: int = 0,
    topics: Sequence[str] | None = None,
) -> dict[str, list[SyntheticFact]]:
    """Generate the fact tables behind :func:`synthetic_topic_tasks`.

    Args:
        num_experiences: how many topics (experiences) to generate.
        entities_per_topic: entities per topic; each gets one value per relation.
        seed: random seed; the same arguments always give the same facts.
        topics: family names to draw experiences from, in order (default: all of
            :data:`TOPIC_FAMILIES` in their order); the first ``num_experiences`` are used.

    Returns:
        topic name -> its facts, entity by entity, relation by relation.

    Raises:
        ValueError: if ``num_experiences`` or ``entities_per_topic`` is out of range.
        KeyError: if a topic name is unknown.
    """
    if entities_per_topic < 1:
        raise ValueError(f"entities_per_topic must be at least 1, got {entities_per_topic}")
    families = _select_families(num_experiences, topics)
    rng = random.Random(seed)
    names = _NameGenerator(rng)  # one generator for the stream: no entity or value repeats across topics
    facts: dict[str, list[SyntheticFact]] = {}
    for family in families:
        topic_facts = []
        for _ in range(entities_per_topic):
            entity = names.new(family.entity_kind)
            for relation in family.relations:
                value = _draw_value(relation.value_kind, names, rng)
                topic_facts.append(SyntheticFact(family.name, entity, relation.name, value))
        facts[family.name] = topic_facts
    return facts


def _capitalize(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]  # entities like "the brig Korva" may open a sentence


def _render(template: str, entity: str, value: str) -> str:
    return _capitalize(template.format(e=entity, v=value))


@register_loader
def synthetic_topic_tasks(
    num_experiences: int = 3,
    entities_per_topic: int = 8,
    seed: int = 0,
    topics: Sequence[str] | None = None,
    train_phrasings: int | None = None,
    include_profiles: bool = True,
) -> list[TextTask]:
    """The embedded topic stream: one language-modelling experience per topic.

    Args:
        num_experiences: how many experiences (topics), at most ``len(TOPIC_FAMILIES)`` (8).
        entities_per_topic: fictional entities per topic (each has 4 facts).
        seed: random seed; the same arguments always give the same stream.
        topics: family names to use, in order (default: ``people, cities, companies,
            species, planets, bands, dishes, ships``); the first ``num_experiences`` are used.
        train_phrasings: how many training phrasings of each fact to use (1 to 5; default
            all 5). Fewer phrasings make recall of the held-out phrasing harder.
        include_profiles: add one "profile" line per entity listing all its facts to the
            train split.

    Returns:
        ``num_experiences`` :class:`TextTask` objects named after their topic. ``train`` holds
        every fact in each training phrasing (shuffled); ``test`` holds every fact in each
        held-out phrasing.

    Raises:
        ValueError: on out-of-range sizes.
        KeyError: on an unknown topic name.
    """
    facts_by_topic = synthetic_topic_facts(num_experiences, entities_per_topic, seed, topics)
    max_phrasings = min(len(relation.train_templates) for family in TOPIC_FAMILIES for relation in family.relations)
    phrasings = max_phrasings if train_phrasings is None else train_phrasings
    if not 1 <= phrasings <= max_phrasings:
        raise ValueError(f"train_phrasings must be between 1 and {max_phrasings}, got {train_phrasings}")
    rng = random.Random(f"{seed}-sentences")  # separate stream: sentence order does not change the facts
    tasks = []
    for topic, facts in facts_by_topic.items():
        relations = {relation.name: relation for relation in _family_by_name(topic).relations}
        train, test = [], []
        for fact in facts:
            relation = relations[fact.relation]
            train.extend(_render(t, fact.entity, fact.value) for t in relation.train_templates[:phrasings])
            test.extend(_render(t, fact.entity, fact.value) for t in relation.test_templates)
        if include_profiles:
            train.extend(_profile(entity, [f for f in facts if f.entity == entity], relations)
                         for entity in dict.fromkeys(f.entity for f in facts))
        rng.shuffle(train)
        tasks.append(TextTask(name=topic, train=train, test=test))
    return tasks


def _profile(entity: str, facts: list[SyntheticFact], relations: dict[str, Relation]) -> str:
    """A data-sheet line listing all facts of one entity, e.g. ``"Profile of X: born in Y; job: pilot; ..."``."""
    items = "; ".join(f"{relations[fact.relation].profile_label}: {fact.value}" for fact in facts)
    return _capitalize(f"Profile of {entity}: {items}.")
