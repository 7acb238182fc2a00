"""README and docs/: every relative link resolves, and the pages stay short enough to read."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def _links(text: str) -> list[str]:
    # Markdown links and images, outside code blocks; anchors and web addresses are not files.
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://", "#"))]


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in PAGES for target in _links(page.read_text())
              if not (page.parent / target.split("#")[0]).exists()]
    assert not broken, broken
    assert len(_links((ROOT / "README.md").read_text())) >= 5  # the check above has something to check


def test_readme_is_short_with_the_quick_start_and_the_headline_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    first = "\n".join(lines[:60])
    assert "uv sync" in first and "uv run main.py --preset quick" in first
    assert any(line.startswith("## Headline result") for line in lines[:150])
    heads = [line for line in lines if line.startswith("## ")]
    assert heads.index("## Headline result") < heads.index("## Quick start")  # the claim first, then how to run it
    for page in (ROOT / "docs").glob("*.md"):
        assert len(page.read_text().splitlines()) <= 600, page.name
