"""The embedded synthetic topic stream: sizes, determinism, held-out phrasings, errors."""

import pytest

from metakv_cl.data.synthetic import TOPIC_FAMILIES, synthetic_topic_facts, synthetic_topic_tasks
from metakv_cl.data.tasks import TextTask


def test_default_stream_sizes_and_names():
    tasks = synthetic_topic_tasks()
    assert [task.name for task in tasks] == ["people", "cities", "companies"]
    for task in tasks:
        assert isinstance(task, TextTask)
        # 8 entities x 4 relations x 5 train phrasings + 8 profiles; 8 x 4 x 2 held-out phrasings.
        assert len(task.train) == 168
        assert len(task.test) == 64


def test_same_seed_same_stream_other_seed_other_facts():
    first = synthetic_topic_tasks(seed=7)
    again = synthetic_topic_tasks(seed=7)
    other = synthetic_topic_tasks(seed=8)
    assert [(t.train, t.test) for t in first] == [(t.train, t.test) for t in again]
    assert first[0].test != other[0].test


def test_test_split_holds_held_out_phrasings_of_the_same_facts():
    facts = synthetic_topic_facts(num_experiences=3, entities_per_topic=5, seed=2)
    tasks = synthetic_topic_tasks(num_experiences=3, entities_per_topic=5, seed=2)
    for task in tasks:
        assert not set(task.train) & set(task.test), "a test sentence was also a training sentence"
        for fact in facts[task.name]:
            # Each fact is stated in training and asked again in both held-out phrasings,
            # with the value as the last thing in the sentence.
            in_train = [s for s in task.train if fact.value in s and fact.entity.lower() in s.lower()]
            in_test = [s for s in task.test if s.rstrip(".").endswith(fact.value) and fact.entity.lower() in s.lower()]
            assert len(in_train) >= 5, fact
            assert len(in_test) >= 2, fact
    for family in TOPIC_FAMILIES:
        for relation in family.relations:
            assert not set(relation.train_templates) & set(relation.test_templates)
            assert all(template.rstrip(".").endswith("{v}") for template in relation.test_templates)


def test_each_experience_has_its_own_entities():
    facts = synthetic_topic_facts(num_experiences=len(TOPIC_FAMILIES), entities_per_topic=6, seed=0)
    entity_sets = [{fact.entity for fact in topic_facts} for topic_facts in facts.values()]
    assert all(len(entities) == 6 for entities in entity_sets)
    all_entities = [entity for entities in entity_sets for entity in entities]
    assert len(all_entities) == len(set(all_entities))
    assert len({family.name for family in TOPIC_FAMILIES}) == len(TOPIC_FAMILIES) == 8


def test_topic_selection_and_phrasing_count():
    tasks = synthetic_topic_tasks(num_experiences=2, entities_per_topic=3, topics=["ships", "dishes", "bands"],
                                  train_phrasings=1, include_profiles=False)
    assert [task.name for task in tasks] == ["ships", "dishes"]
    assert [len(task.train) for task in tasks] == [12, 12]  # 3 entities x 4 relations x 1 phrasing
    assert any(sentence.startswith("The ") for sentence in tasks[0].train)  # "the brig X" capitalised


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_experiences": 0}, ValueError, "num_experiences"),
        ({"num_experiences": 9}, ValueError, "between 1 and 8"),
        ({"entities_per_topic": 0}, ValueError, "entities_per_topic"),
        ({"train_phrasings": 6}, ValueError, "train_phrasings"),
        ({"topics": ["people", "dragons", "cities"]}, KeyError, "dragons"),
        ({"topics": ["people", "people", "cities"]}, ValueError, "distinct"),
    ],
)
def test_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        synthetic_topic_tasks(**kwargs)
