"""Wikipedia XML dump loader: a small dump written in tmp_path (plain and bz2)."""

import bz2
from xml.sax.saxutils import escape

import pytest

from metakv_cl.data.wikipedia_dump import iter_wikipedia_pages, strip_wikitext, tasks_from_wikipedia_dump

RIVER_ARTICLE = """{{Infobox river
| name = Velor
| length = {{convert|12|km}}
}}
The '''Velor''' ({{lang-xx|Velör}}) is a [[river]] in [[Northland|the north]].<ref>{{cite web|url=http://x.org}}</ref> It is long.<ref name="a"/>
[[File:Velor.jpg|thumb|The [[Velor]] at dawn]]
== History ==
Settlers arrived in 1200.<!-- hidden remark --> See [http://example.com the site]&nbsp;now.
{| class="wikitable"
| a || b
|}
* First item
== References ==
{{reflist}}
[[Category:Rivers of Northland]]
[[de:Velor]]"""

FILLER = " It flows past old mills, wide meadows and quiet villages on its way to the sea." * 3


def _page(title, text, ns=0, redirect=None):
    redirect_tag = f'<redirect title="{escape(redirect)}" />' if redirect else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{redirect_tag}"
            f"<revision><id>2</id><text xml:space=\"preserve\">{escape(text)}</text></revision></page>")


def _article(subject, *categories):
    links = "\n".join(f"[[Category:{category}]]" for category in categories)
    return f"'''{subject}''' is a subject of this test.{FILLER}\n{links}"


PAGES = [
    _page("Velor", RIVER_ARTICLE.replace("* First item", "* First item\n" + FILLER.strip())),
    _page("Amber River", _article("Amber River", "Rivers_of_Northland")),
    _page("Lake Sorn", _article("Lake Sorn", "lakes of  Northland")),
    _page("Ada Korv", _article("Ada Korv", "Physicists", "Rivers of Northland")),  # first matching task wins
    _page("Bo Lind", _article("Bo Lind", "Physicists")),
    _page("Cy Marr", _article("Cy Marr", "Physicists")),
    _page("Dee Nox", _article("Dee Nox", "Physicists")),
    _page("Old Velor", "#REDIRECT [[Velor]]\n[[Category:Rivers of Northland]]", redirect="Velor"),
    _page("Talk:Velor", _article("Talk page", "Rivers of Northland"), ns=1),
    _page("Tiny River", "'''Tiny River''' is short.\n[[Category:Rivers of Northland]]"),
]
DUMP = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">'
        "<siteinfo><sitename>Wikipedia</sitename></siteinfo>" + "".join(PAGES) + "</mediawiki>")
CATEGORIES = {"rivers": ["Rivers of Northland", "Category:Lakes_of_Northland"], "physicists": ["physicists"]}


@pytest.fixture
def dump_paths(tmp_path):
    plain = tmp_path / "dump.xml"
    plain.write_text(DUMP, encoding="utf-8")
    compressed = tmp_path / "dump.xml.bz2"
    compressed.write_bytes(bz2.compress(DUMP.encode("utf-8")))
    return plain, compressed


def test_strip_wikitext_keeps_prose_only():
    assert strip_wikitext(RIVER_ARTICLE) == (
        "The Velor is a river in the north. It is long.\n"
        "History\n"
        "Settlers arrived in 1200. See the site now.\n"
        "First item"
    )


def test_pages_stream_skips_redirects_and_other_namespaces(dump_paths):
    plain, _ = dump_paths
    pages = list(iter_wikipedia_pages(plain))
    assert [page.title for page in pages] == ["Velor", "Amber River", "Lake Sorn", "Ada Korv", "Bo Lind", "Cy Marr",
                                              "Dee Nox", "Tiny River"]
    assert pages[2].categories == {"lakes of northland"}
    assert pages[3].categories == {"physicists", "rivers of northland"}


def test_tasks_from_plain_and_bz2_dumps_agree(dump_paths):
    plain, compressed = dump_paths
    tasks = tasks_from_wikipedia_dump(plain, CATEGORIES, test_fraction=0.25, seed=1)
    assert [task.name for task in tasks] == ["rivers", "physicists"]
    rivers = tasks[0].train + tasks[0].test
    assert sorted(text.split("\n", 1)[0] for text in rivers) == ["Ada Korv", "Amber River", "Lake Sorn", "Velor"]
    assert sorted(text.split("\n", 1)[0] for text in tasks[1].train + tasks[1].test) == ["Bo Lind", "Cy Marr",
                                                                                          "Dee Nox"]
    assert [len(tasks[0].test), len(tasks[1].test)] == [1, 1]
    velor = next(text for text in rivers if text.startswith("Velor\n"))
    assert velor.startswith("Velor\nThe Velor is a river in the north.")
    assert "Category" not in velor and "{{" not in velor and "[[" not in velor
    from_bz2 = tasks_from_wikipedia_dump(compressed, CATEGORIES, test_fraction=0.25, seed=1)
    assert [(t.train, t.test) for t in from_bz2] == [(t.train, t.test) for t in tasks]


def test_max_articles_per_task_takes_the_first_in_dump_order(dump_paths):
    plain, _ = dump_paths
    tasks = tasks_from_wikipedia_dump(plain, CATEGORIES, max_articles_per_task=2, include_title=False)
    assert [len(task.train) + len(task.test) for task in tasks] == [2, 2]
    assert all(not text.startswith("Velor\n") for task in tasks for text in task.train + task.test)
    assert any(text.startswith("The Velor is a river") for text in tasks[0].train + tasks[0].test)


def test_clear_errors(dump_paths, tmp_path):
    plain, _ = dump_paths
    with pytest.raises(FileNotFoundError, match="missing.xml"):
        tasks_from_wikipedia_dump(tmp_path / "missing.xml", CATEGORIES)
    with pytest.raises(ValueError, match="'chemists': 0 article"):
        tasks_from_wikipedia_dump(plain, {"rivers": ["Rivers of Northland"], "chemists": ["Chemists"]})
    with pytest.raises(ValueError, match="list of category names"):
        tasks_from_wikipedia_dump(plain, {"rivers": "Rivers of Northland"})
    with pytest.raises(ValueError, match="categories is empty"):
        tasks_from_wikipedia_dump(plain, {})
