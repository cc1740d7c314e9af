"""The project stands alone: every Markdown file that code, tests, configs or docs cite exists in
the repository (a citation of notes kept elsewhere leaves a maintainer with nothing to read)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED = re.compile(r"[\w./-]+\.md\b")
SEARCHED = ("*.py", "*.md", "*.toml", "*.sh")
SKIPPED_DIRS = {".venv", ".git", "outputs", "arbor_titan.egg-info", "__pycache__"}
# Names that are not citations: files a test creates in its temporary folder.
NOT_CITATIONS = {"skip.md"}


def sources() -> list[Path]:
    return sorted(
        path
        for pattern in SEARCHED
        for path in REPO.rglob(pattern)
        if SKIPPED_DIRS.isdisjoint(path.relative_to(REPO).parts)
    )


def test_every_cited_markdown_file_exists():
    missing = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sources()
        for name in CITED.findall(path.read_text(errors="replace"))
        if name not in NOT_CITATIONS
        and not (path.parent / name).is_file()
        and not (REPO / name).is_file()
    }
    assert not missing, f"cited but not in the repository: {sorted(missing)}"
