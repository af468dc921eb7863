"""Point the code's references at the documents the repository ships.

Rewrites, in ``.py`` and ``.md`` files:

* ``spec §X`` (and ``spec/fisher-math.md``) -> ``docs/fisher-math.md §X``: the note keeps the section numbers of the
  specification it replaces (§0-§14, subsections such as §7.1), so the rewrite is mechanical;
* ``STYLE.md §N`` (and a bare ``STYLE.md``) -> ``docs/design.md §N``: the design note keeps STYLE.md's §1-§10.

Usage::

    python scripts/fix_refs.py tests benchmarks examples        # rewrite in place, print what changed
    python scripts/fix_refs.py --check fisher_optim tests benchmarks examples README.md   # exit 1 if any remain

Arguments are files or folders (searched recursively for ``*.py`` and ``*.md``).  Without arguments:
``fisher_optim tests benchmarks examples README.md CHANGELOG.md``.  ``--check`` rewrites nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["fisher_optim", "tests", "benchmarks", "examples", "README.md", "CHANGELOG.md"]
LINE_LENGTH = 120  # ruff's line-length in pyproject.toml
SKIP = {"fix_refs.py"}  # this script names the old references on purpose

RULES = [
    (re.compile(r"\bspec/fisher-math\.md\b"), "docs/fisher-math.md"),
    (re.compile(r"\bspec\s+§"), "docs/fisher-math.md §"),
    (re.compile(r"(?<![\w/])STYLE\.md\b"), "docs/design.md"),
]


def files(paths: list[str]):
    for p in map(Path, paths):
        p = p if p.is_absolute() else ROOT / p
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.suffix in (".py", ".md") and q.name not in SKIP)
        elif p.is_file() and p.name not in SKIP:
            yield p


def rewrite(text: str) -> tuple[str, int]:
    count = 0
    for pattern, repl in RULES:
        text, n = pattern.subn(repl, text)
        count += n
    return text, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=DEFAULT)
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if any old reference remains")
    args = parser.parse_args(argv)
    total, long_lines = 0, []
    for f in files(args.paths):
        old = f.read_text(encoding="utf-8")
        new, n = rewrite(old)
        if not n:
            continue
        total += n
        print(f"{f.relative_to(ROOT)}: {n} reference(s)" + ("" if args.check else " rewritten"))
        if not args.check:
            f.write_text(new, encoding="utf-8")
            if f.suffix == ".py":  # the new name is 15 characters longer: say where ruff's 120 may now be exceeded
                long_lines += [f"{f.relative_to(ROOT)}:{i}" for i, line in enumerate(new.splitlines(), 1)
                               if len(line) > LINE_LENGTH and "docs/" in line]  # fmt: skip
    print(f"{total} reference(s) {'left' if args.check else 'rewritten'}")
    if long_lines:
        print(f"lines now over {LINE_LENGTH} characters (re-wrap them): " + ", ".join(long_lines))
    return 1 if args.check and total else 0


if __name__ == "__main__":
    sys.exit(main())
