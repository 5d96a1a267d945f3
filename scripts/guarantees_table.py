"""Renders the conformance suite's results (JUnit XML, one file per transport) as the table of
guarantees in docs/transports.md, so the docs cannot drift from what passes.

    python scripts/guarantees_table.py --write  results/conformance-*.xml   # update the doc
    python scripts/guarantees_table.py --check  results/conformance-*.xml   # fail if it drifted
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "transports.md"
BEGIN, END = "<!-- guarantees:begin -->", "<!-- guarantees:end -->"


def load(path: Path) -> tuple[str, dict[str, str]]:
    """(transport, {case: 'pass' | 'skip' | 'fail'}) from one JUnit file named
    conformance-<transport>.xml (':' written as '_')."""
    transport = path.stem.removeprefix("conformance-").replace("_", ":")
    cases: dict[str, str] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = re.sub(r"\[.*\]$", "", tc.get("name", ""))
        outcome = ("fail" if tc.find("failure") is not None or tc.find("error") is not None
                   else "skip" if tc.find("skipped") is not None else "pass")
        # A parametrized case holds only if every parameter passes.
        order = {"fail": 2, "skip": 1, "pass": 0}
        if order[outcome] >= order.get(cases.get(name, "pass"), 0):
            cases[name] = outcome
    return transport, cases


def render(results: list[tuple[str, dict[str, str]]]) -> str:
    mark = {"pass": "yes", "skip": "n/a", "fail": "**FAILS**"}
    names = sorted({c for _, cases in results for c in cases})
    lines = ["| guarantee (conformance case) | " + " | ".join(t for t, _ in results) + " |",
             "|---|" + "---|" * len(results)]
    for n in names:
        label = n.removeprefix("test_").replace("_", " ")
        lines.append(f"| {label} | " + " | ".join(mark[c.get(n, 'skip')] for _, c in results)
                     + " |")
    lines.append("")
    lines.append("yes: passes on this build's CI machine; n/a: skipped (transport unavailable "
                 "there, or a capability it does not claim).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="update docs/transports.md")
    mode.add_argument("--check", action="store_true", help="fail if it differs")
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args(argv)
    results = [load(p) for p in args.files]
    results.sort(key=lambda r: (r[0] != "tcp", r[0]))
    table = render(results)
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{DOC} has no {BEGIN} ... {END} section", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table}\n{END}{tail}"
    if args.write:
        DOC.write_text(new)
        return 0
    if new != doc:
        print("docs/transports.md's guarantees table differs from the suite's results; run "
              "scripts/guarantees_table.py --write with them", file=sys.stderr)
        print(table, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
