"""The documents the code cites exist and have the sections it cites (docs/fisher-math.md, docs/design.md)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["fisher_optim", "tests", "benchmarks", "examples", "scripts", "README.md", "CHANGELOG.md"]


def sections(doc: str) -> set[str]:
    """Section numbers of a markdown note: '## 7. Title' -> '7', '### 7.1 Title' -> '7.1'."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def cited(doc: str):
    """Every (file, section) citing ``docs/<doc> §X`` (a letter or item after the number is not part of it)."""
    pattern = re.compile(rf"docs/{re.escape(doc)} §(\d+(?:\.\d+)?)")
    for entry in SOURCES:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".py", ".md"))
        for f in files:
            for m in pattern.finditer(f.read_text(encoding="utf-8")):
                yield f.relative_to(ROOT).as_posix(), m.group(1)


def test_fisher_math_keeps_the_spec_section_numbers():
    have = sections("fisher-math.md")
    expected = {str(i) for i in range(15)} | {"2.1", "2.2", "2.3", "3.1", "3.2", "4.1", "4.2", "4.3", "4.4"}
    expected |= {f"5.{i}" for i in range(1, 7)} | {f"7.{i}" for i in range(1, 7)}
    assert expected <= have, sorted(expected - have)


def test_design_note_has_sections_1_to_10():
    assert {str(i) for i in range(1, 11)} <= sections("design.md")


@pytest.mark.parametrize("doc", ["fisher-math.md", "design.md"])
def test_every_citation_resolves(doc):
    have = sections(doc)
    missing = sorted({(f, s) for f, s in cited(doc) if s not in have})
    assert not missing, missing
