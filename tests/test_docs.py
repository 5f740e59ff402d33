"""The README is the how and stays short; every link in it and in docs/ leads somewhere."""

import re

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def broken_links(path):
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue  # the web is out of reach here
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_link_resolves(path):
    assert not broken_links(path), f"{path.name}: broken links {broken_links(path)}"


def test_readme_is_short_and_keeps_its_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) <= 2500, len(text.split())
    for section in ("## Quickstart", "## Tests"):
        assert section in text
    assert "docs/" in text
