"""The README is a guide and docs/ its reference: every link between them leads somewhere, and no page is orphaned."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
# [text](target) and ![alt](target), not inside code; an optional "title" after the target.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """`text` without fenced blocks and inline code, where brackets are code, not links."""
    return CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = anchor(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)  # GitHub numbers repeated headings
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


def broken_links(page: Path) -> list[str]:
    """Each link of `page` to a file that does not exist, or to a heading its Markdown file does not have."""
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are outside the checkout
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / unquote(path)).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_links_every_page_of_the_reference_and_stays_short() -> None:
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(README)}
    assert [page.name for page in DOCS.glob("*.md") if page.resolve() not in linked] == []
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150  # a page a newcomer reads in minutes


def test_the_readme_pictures_are_small_pngs() -> None:
    pictures = [target for target in links(README) if target.endswith(".png")]
    assert len(pictures) == 2
    for target in pictures:
        picture = (REPO / target).read_bytes()
        assert picture.startswith(b"\x89PNG\r\n\x1a\n") and len(picture) < 300_000


def test_the_readme_states_the_test_command_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test\b", ci, re.M)
    assert re.search(r"^make test\s", README.read_text(encoding="utf-8"), re.M)


def test_the_link_checker_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A heading, with `code`\n## A heading, with `code`\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-with-code) [second](other.md#a-heading-with-code-1) [gone](nowhere.md)\n"
        "[no heading](other.md#missing) [here](#in-page) `[code](nowhere.md)`\n```\n[fenced](x.md)\n```\n"
        "## In page\n",
        encoding="utf-8",
    )
    assert broken_links(page) == ["nowhere.md: no such file", "other.md#missing: no such heading"]
