"""Topic streams from a real Wikipedia XML dump, one experience per group of categories.

Users bring their own dump (``*-pages-articles*.xml`` or ``.xml.bz2`` from
dumps.wikimedia.org). The dump is parsed as a stream (``xml.etree.ElementTree.iterparse``,
every record, page or not, freed as soon as it ends), so memory stays flat for any dump size, and
parsing stops as soon as every task has ``max_articles_per_task`` articles.

An article belongs to a task when one of its ``[[Category:...]]`` links names one of the
task's categories. Category names match as MediaWiki titles do, ignoring underscores vs
spaces, repeated spaces and case. Only direct membership counts: subcategories are not
followed (list them explicitly). An article in the categories of several tasks goes to
the first such task in ``categories`` order, so experiences never share an article.
Only main-namespace (``ns`` 0) pages that are not redirects are used.

Wikitext is reduced to plain prose by :func:`strip_wikitext` (templates, tables, references,
files, categories, markup and the trailing "References"/"External links"/... sections go).
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence

from metakv_cl.data.dbpedia import split_holdout
from metakv_cl.data.registry import register_loader
from metakv_cl.data.tasks import TextTask

__all__ = ["WikiPage", "iter_wikipedia_pages", "strip_wikitext", "normalize_category", "tasks_from_wikipedia_dump"]


@dataclass(frozen=True)
class WikiPage:
    """A main-namespace article of a dump.

    Args:
        title: page title.
        wikitext: the raw wikitext of its latest revision.
        categories: normalised names of its direct categories (see :func:`normalize_category`).
    """

    title: str
    wikitext: str
    categories: frozenset[str]


_CATEGORY_LINK = re.compile(r"\[\[\s*Category\s*:\s*([^\]|]+?)\s*(?:\|[^\]]*)?\]\]", re.IGNORECASE)
# Sections that hold links and citations rather than prose; the article is cut at the first.
_TRAILING_SECTIONS = re.compile(
    r"^==+\s*(References|Notes|Footnotes|Citations|Sources|Bibliography|Further reading|External links|See also)"
    r"\s*==+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
# Link prefixes whose link is dropped entirely rather than replaced by its label.
_DROPPED_LINK_PREFIXES = ("file:", "image:", "media:", "category:")
_TEMPLATE_MARKS = re.compile(r"\{\{|\}\}")
_TABLE_MARKS = re.compile(r"\{\||\|\}")
_LINK_MARKS = re.compile(r"\[\[|\]\]")
_TAG_BLOCK = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight)\b[^<>]*>(?:[^<]|<(?!/?\1\b))*?</\1\s*>", re.IGNORECASE
)
_HEADING = re.compile(r"(=+)([^=](?:.*[^=])?)\1")
_INTERWIKI = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?:")


def normalize_category(name: str) -> str:
    """A category name in a comparable form: no "Category:" prefix, spaces for underscores,
    single spaces, lower case."""
    name = re.sub(r"^\s*category\s*:", "", name, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def _replace_nested(text: str, marks: re.Pattern[str], opener: str, replace: Callable[[str], str]) -> str:
    """Replace every balanced ``opener ... closer`` span, innermost first, in one left-to-right pass.

    ``marks`` matches the opener and the closer. Each span's content (its inner spans already
    replaced) goes through ``replace``; unbalanced marks stay as text. One pass keeps deeply
    nested templates linear: removing innermost matches until none is left costs a pass per
    nesting level.
    """
    stack: list[list[str]] = [[]]
    position = 0
    for match in marks.finditer(text):
        stack[-1].append(text[position : match.start()])
        position = match.end()
        if match.group() == opener:
            stack.append([])
        elif len(stack) > 1:
            content = "".join(stack.pop())
            stack[-1].append(replace(content))
        else:
            stack[-1].append(match.group())
    stack[-1].append(text[position:])
    return opener.join("".join(level) for level in stack)  # unclosed openers stay as text


def _drop(_: str) -> str:
    return ""


def _link_text(content: str) -> str:
    target, _, label = content.partition("|")
    if target.strip().lower().startswith(_DROPPED_LINK_PREFIXES) or _INTERWIKI.match(target.strip()):
        return ""
    # [[Target|label]] shows the last pipe segment; [[Target]] shows the target.
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def strip_wikitext(wikitext: str) -> str:
    """Plain prose from wikitext.

    Args:
        wikitext: raw article wikitext.

    Returns:
        Paragraphs separated by newlines: headings are kept as their own lines, links become
        their labels; templates (infoboxes, citations), tables, references, comments, files,
        categories, interlanguage links, bold/italic quotes, HTML tags and list markers are
        removed; the article is cut at its first References/Notes/External links/See also
        (and similar) section.
    """
    # The patterns below never scan past the next opening mark, so that unclosed marks cost
    # linear time, not a scan to the end of the text per mark.
    # MediaWiki ends an unclosed comment at the end of the text
    text = re.sub(r"<!--.*?(?:-->|\Z)", "", wikitext, flags=re.DOTALL)
    text = re.sub(r"<ref[^<>]*/>", "", text, flags=re.IGNORECASE)
    text = _TAG_BLOCK.sub("", text)
    text = _replace_nested(text, _TEMPLATE_MARKS, "{{", _drop)
    text = _replace_nested(text, _TABLE_MARKS, "{|", _drop)
    cut = _TRAILING_SECTIONS.search(text)
    if cut:
        text = text[: cut.start()]
    text = _replace_nested(text, _LINK_MARKS, "[[", _link_text)  # a file caption's links go with the file
    text = re.sub(r"\[(?:https?|ftp)://[^\s\[\]]+\s*([^\[\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^<>]+>", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    lines = []
    for line in text.splitlines():
        heading = _HEADING.fullmatch(line.strip())
        if heading:
            line = heading.group(2)
        elif line.lstrip().startswith(("|", "!")):  # leftovers of malformed tables
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left where templates were removed
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def _open_dump(path: Path) -> IO[bytes]:
    return bz2.open(path, "rb") if path.suffix == ".bz2" else path.open("rb")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # "{http://www.mediawiki.org/xml/export-0.11/}page" -> "page"


def iter_wikipedia_pages(xml_path: str | Path) -> Iterator[WikiPage]:
    """Stream the main-namespace, non-redirect articles of a dump.

    Args:
        xml_path: a MediaWiki XML export, plain (``.xml``) or bzip2-compressed (``.bz2``).

    Yields:
        :class:`WikiPage` objects in dump order.

    Raises:
        FileNotFoundError: if the file does not exist (the message names it).
        ValueError: if the XML is malformed or the compressed file truncated (the message names it).
    """
    path = Path(xml_path)
    if not path.is_file():
        raise FileNotFoundError(f"Wikipedia dump not found: {path}")
    try:
        with _open_dump(path) as stream:
            yield from _pages(stream)
    except (ElementTree.ParseError, EOFError, OSError) as error:  # malformed XML, truncated or damaged .bz2
        raise ValueError(f"{path}: not a readable MediaWiki XML dump ({type(error).__name__}: {error})") from None


def _pages(stream: IO[bytes]) -> Iterator[WikiPage]:
    depth = 0
    root = None
    for event, element in ElementTree.iterparse(stream, events=("start", "end")):
        if event == "start":
            root = element if root is None else root
            depth += 1
            continue
        depth -= 1
        if depth != 1:  # only the root's children (pages, siteinfo, ...) are whole records
            continue
        if _local(element.tag) == "page":
            page = _page(element)
            if page is not None:
                yield page
        root.clear()  # drop every finished record, page or not: memory stays flat on multi-GB dumps


def _page(element: ElementTree.Element) -> WikiPage | None:
    """The article of a ``<page>`` element, or None for redirects and other namespaces."""
    fields = {_local(child.tag): child for child in element.iter()}
    is_article = (fields.get("ns") is not None and (fields["ns"].text or "").strip() == "0"
                  and "redirect" not in fields)
    if not is_article or fields.get("text") is None:
        return None
    wikitext = fields["text"].text or ""
    categories = frozenset(normalize_category(name) for name in _CATEGORY_LINK.findall(wikitext))
    title = fields["title"].text if fields.get("title") is not None else ""
    return WikiPage(title=(title or "").strip(), wikitext=wikitext, categories=categories)


@register_loader
def tasks_from_wikipedia_dump(
    xml_path: str | Path,
    categories: Mapping[str, Sequence[str]],
    test_fraction: float = 0.2,
    max_articles_per_task: int | None = None,
    seed: int = 0,
    min_chars: int = 200,
    include_title: bool = True,
) -> list[TextTask]:
    """Build a topic stream from a dump: one language-modelling experience per category group.

    Args:
        xml_path: the dump (``.xml`` or ``.xml.bz2``).
        categories: experience name -> category names (with or without ``Category:``), in
            stream order.
        test_fraction: share of each experience's articles held out for evaluation.
        max_articles_per_task: keep the first N matching articles (dump order) per
            experience; parsing stops when every experience is full. Default: all.
        seed: seeds each experience's train/test split.
        min_chars: drop articles whose stripped text is shorter (stubs, lists).
        include_title: start each text with the article title on its own line.

    Returns:
        One :class:`TextTask` per entry of ``categories``; each text is one article.

    Raises:
        FileNotFoundError: if the dump does not exist.
        ValueError: if ``categories`` is empty or lists no category for an experience, or an
            experience gets fewer than 2 articles (the message names it and its categories).
    """
    if not categories:
        raise ValueError("categories is empty: give at least one experience name -> category list")
    if max_articles_per_task is not None and max_articles_per_task < 2:
        raise ValueError(f"max_articles_per_task must be at least 2 (one train, one test) or None, "
                         f"got {max_articles_per_task}")
    wanted = {}
    for task_name, names in categories.items():
        if isinstance(names, str) or not names:
            raise ValueError(f"experience {task_name!r}: give a list of category names, got {names!r}")
        wanted[task_name] = {normalize_category(name) for name in names}

    articles: dict[str, list[str]] = {task_name: [] for task_name in wanted}
    for page in iter_wikipedia_pages(xml_path):
        task_name = next((name for name, cats in wanted.items() if page.categories & cats), None)
        if task_name is None or len(articles[task_name]) == max_articles_per_task:
            continue
        text = strip_wikitext(page.wikitext)
        if len(text) < min_chars:
            continue
        articles[task_name].append(f"{page.title}\n{text}" if include_title else text)
        if max_articles_per_task is not None and all(len(a) >= max_articles_per_task for a in articles.values()):
            break

    tasks = []
    for task_name, texts in articles.items():
        if len(texts) < 2:
            raise ValueError(
                f"experience {task_name!r}: {len(texts)} article(s) of at least {min_chars} characters in "
                f"categories {sorted(categories[task_name])} of {xml_path}; an experience needs at least 2"
            )
        train, test = split_holdout(texts, test_fraction, f"{seed}-{task_name}", task_name)
        tasks.append(TextTask(name=task_name, train=train, test=test))
    return tasks
