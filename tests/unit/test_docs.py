"""README and docs/ stay true: their links resolve, and the layout names every module.

The settings table (tests/system/test_deployment.py), the examples (tests/integration/test_demo.py) and the
compose sample commands (scripts/test-compose) are checked against the code where they run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")


def slugs(markdown: str) -> set[str]:
    """The anchors GitHub makes of a document's headings (outside code blocks)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists() or (
            anchor and dest.suffix == ".md" and anchor not in slugs(dest.read_text(encoding="utf-8"))
        ):
            broken.append(target)
    assert broken == [], f"{doc.name}: {broken}"


def test_the_layout_table_names_every_module() -> None:
    layout = (ROOT / "docs" / "design.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    named = " ".join(re.findall(r"^\| (.+?) \|", layout, flags=re.M))
    package = ROOT / "downloader_service"
    missing = []
    for module in sorted(package.rglob("*.py")):
        rel = module.relative_to(package)
        if (rel.name == "__init__.py" and rel.parent != Path("cli")) or "migrations" in rel.parts:
            continue
        short = str(rel)
        if f"`{short}`" not in named and f"`{rel.parent}/`" not in named:
            missing.append(short)
    assert missing == []


def test_readme_is_the_front_door() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in readme, doc.name
    assert "bash scripts/serve" in readme and "bash scripts/test" in readme
