"""README and docs/: every relative link resolves, and the pages stay short enough to read."""

import functools
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


COMPARISONS = ("| comparison | band", "| comparison | k |")


def _tables(text: str, heads: tuple[str, ...] = COMPARISONS) -> list[list[str]]:
    """The markdown tables whose header starts with one of ``heads``, as lists of rows; by default the paired
    comparisons (``| comparison | band ...``, the bands' reading, or ``| comparison | k ...``, the envelope's)."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith(heads):
            current = [line]
            tables.append(current)
        elif current is not None and line.startswith("|"):
            current.append(line)
        else:
            current = None
    return tables


# the family script's tables: the comparisons, and each method's cells (the envelope's per k, the bands' per band)
RESULT_TABLES = (*COMPARISONS, "| method | k = ", "| method | 1 ± ")


def _family_commands(text: str) -> list[tuple[list[str], str]]:
    """Each ``uv run scripts/study_family.py A B --tables`` in a page (a line may continue with a backslash):
    its two files and the page's text from it to the next such command, where its tables are."""
    found = list(re.finditer(r"uv run scripts/study_family\.py ((?:[^\n\\]|\\\n)*?)--tables", text))
    return [(m.group(1).replace("\\\n", " ").split(), text[m.end():nxt.start() if nxt else len(text)])
            for m, nxt in zip(found, [*found[1:], None])]


@functools.lru_cache
def _family_output(files: tuple[str, ...]) -> str:
    """The family script's printed output for these files; run once per pair (README and docs/studies.md both
    print the preregistered study's command)."""
    import subprocess
    import sys

    assert len(files) == 2 and all((ROOT / f).exists() for f in files), files
    proc = subprocess.run([sys.executable, "scripts/study_family.py", *files, "--tables"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "all equal" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_readme_result_tables_are_what_the_family_script_prints():
    """README's Key results tables are the output of the command printed above them: a change to either results
    file, to the analysis or to README that makes them differ fails here."""
    readme = (ROOT / "README.md").read_text()
    commands = _family_commands(readme)
    assert len(commands) == 1, [files for files, _ in commands]
    files, after = commands[0]
    printed = _tables(_family_output(tuple(files)))
    assert len(printed) == 2 and all(len(t) == 17 for t in printed)  # 2 settings x (header, rule, 15 comparisons)
    assert _tables(readme) == printed
    assert _tables(after) == printed  # below the command that prints them


def test_the_studies_page_tables_are_what_the_family_script_prints():
    """docs/studies.md's result tables (the preregistered study's cells per method, the band study's comparisons
    and cells) each come from the output of the family command printed above them, as README's do;
    none stands without one."""
    page = (ROOT / "docs" / "studies.md").read_text()
    commands = _family_commands(page)
    assert len(commands) >= 2  # the preregistered study's and the band study's
    for files, after in commands:
        shown = _tables(after, RESULT_TABLES)
        printed = _tables(_family_output(tuple(files)), RESULT_TABLES)
        assert shown and all(table in printed for table in shown), files
    assert sum(len(_tables(after, RESULT_TABLES)) for _, after in commands) == len(
        _tables(page, RESULT_TABLES))


def test_no_committed_text_holds_an_absolute_path():
    """Committed text and JSON name paths relative to the repository (or none): a machine's own paths (its
    checkouts, its temporary directories) mean nothing elsewhere."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    texts = [f for f in files if f.endswith((".md", ".json", ".txt", ".toml", ".yaml", ".py", ".sh"))]
    pattern = re.compile(r"(?<![\w.~])/(home|work|tmp|root|Users|mnt|private|var/folders)/[\w.-]+")
    found = []
    for f in texts:
        for n, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1):
            if (m := pattern.search(line)) and not f.startswith("tests/"):  # tests make and name their own temp paths
                found.append(f"{f}:{n}: {m.group(0)}")
    assert texts and not found, found
