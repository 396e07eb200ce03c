"""Plain text from a MediaWiki XML dump: parse the pages, strip the markup, keep the prose.

The embedded `wiki` text is the shortened English Wikipedia dump that gensim ships as test data
(`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`, April 2016, 206 pages of
which 106 are articles and 100 redirects). Cleaning, in order:

1. keep main-namespace pages (`<ns>0</ns>`) that are not redirects;
2. cut the article at its first appendix heading (See also, References, Notes, External links,
   ...): Wikipedia's manual of style puts these last, and they are lists, not prose;
3. drop comments and `<ref>` citations (by regex, before parsing), then `<gallery>`, tables,
   every template (`{{...}}`) and every `[[File:]]`, `[[Image:]]`, `[[Category:]]` link, and
   `strip_code()` the rest, which keeps the visible text of links and formatting;
4. per line: collapse whitespace, tidy what removed templates leave behind (empty
   parentheses, a space before punctuation), drop lines shorter than `MIN_LINE_CHARS` (headings,
   list stubs, table debris); paragraphs are joined with "\\n\\n".

The XML is read with `iterparse`, namespace-agnostic (the tag's `{namespace}` prefix is
ignored), so other dump versions parse too.
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

MIN_LINE_CHARS = 40  # shorter lines are headings, list stubs or markup debris
SKIP_SECTIONS = ("references", "notes", "footnotes", "citations", "see also", "external links",
                 "further reading", "bibliography", "sources")
_APPENDIX = re.compile(r"^\s*==+\s*(" + "|".join(SKIP_SECTIONS) + r")\s*==+\s*$", re.IGNORECASE | re.MULTILINE)
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media)\s*:", re.IGNORECASE)
_DROP_TAGS = frozenset({"ref", "gallery", "table", "references", "math", "timeline", "imagemap", "score", "syntaxhighlight"})
_DEBRIS = re.compile(r"^\s*(\{\||\|\}|\||!|thumb\b)|\|thumb\||\|\s*\w+\s*=", re.IGNORECASE)
# Removed from the raw text first: the parser gives up on some unbalanced markup and would
# then keep a citation or comment verbatim.
_RAW_NOISE = re.compile(r"<!--.*?-->|<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(path: str | Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every main-namespace, non-redirect page of a (.bz2) XML dump."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as handle:
        for _, elem in ET.iterparse(handle, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem}
            title = (fields["title"].text or "") if "title" in fields else ""
            ns = (fields["ns"].text or "0").strip() if "ns" in fields else "0"
            text = next((e.text or "" for e in elem.iter() if _local(e.tag) == "text"), "")
            is_redirect = "redirect" in fields or text.lstrip().upper().startswith("#REDIRECT")
            if ns == "0" and not is_redirect and title:
                yield title, text
            elem.clear()  # the dump is streamed; finished pages are not kept


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing node that was removed first
        pass


def strip_markup(wikitext: str) -> str:
    """The visible prose of one article's wikitext, lines not yet tidied."""
    import mwparserfromhell

    appendix = _APPENDIX.search(wikitext)
    # A regex, not get_sections(): one unclosed tag hides every later heading from the parser.
    body = wikitext[: appendix.start()] if appendix else wikitext
    code = mwparserfromhell.parse(_RAW_NOISE.sub("", body))
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).strip().lower() in _DROP_TAGS:
            _remove(code, tag)
    for template in code.filter_templates(recursive=False):
        _remove(code, template)
    for link in code.filter_wikilinks(recursive=True):
        if _DROP_LINK.match(str(link.title)):
            _remove(code, link)
    return code.strip_code(normalize=True, collapse=True)


def tidy_lines(text: str, min_chars: int = MIN_LINE_CHARS) -> str:
    """Whitespace-normalised paragraphs joined by "\\n\\n"; short and debris lines dropped."""
    keep = []
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        line = re.sub(r"\(\s*[,;:]*\s*\)", "", line)  # "()" or "(; )" left by removed templates
        line = re.sub(r"\s+([,.;:!?])", r"\1", line).strip()
        if len(line) >= min_chars and not _DEBRIS.search(line):
            keep.append(line)
    return "\n\n".join(keep)


def wiki_articles(path: str | Path) -> list[tuple[str, str]]:
    """(title, clean text) of every article in a dump, in dump order; empty articles dropped."""
    out = []
    for title, wikitext in iter_pages(path):
        clean = tidy_lines(strip_markup(wikitext))
        if clean:
            out.append((title, clean))
    return out
