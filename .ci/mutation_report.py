"""Write mutmut's score and every surviving mutant into docs/testing.md (`make mutate` runs it).

    python .ci/mutation_report.py 'pipeline.train.*' ...   # the mutant-name patterns `mutmut run` got

Only the block between the mutmut markers is rewritten; each survivor's fate (killed by which new
test, or why it is equivalent) is kept by hand in the section after it, by mutant name. Survivors
without a fate are listed at the end and make the script exit 1.
"""
from __future__ import annotations

import fnmatch
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"
BEGIN, END = "<!-- mutmut:begin (written by .ci/mutation_report.py) -->", "<!-- mutmut:end -->"
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}


def changed_lines(name: str, path: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    lines = [line for line in get_diff_for_mutant(name, path=path).splitlines()
             if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return " / ".join(" ".join(line.split()) for line in lines)[:300]


def main(patterns: list[str]) -> int:
    os.chdir(ROOT)
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    results = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            if not patterns or any(fnmatch.fnmatch(name, p) for p in patterns):
                results.append((name, str(path), status_by_exit_code[code]))
    if not results:
        print("no mutmut results under mutants/: run `make mutate`", file=sys.stderr)
        return 2
    counts = Counter(status for _, _, status in results)
    detected = sum(counts[s] for s in DETECTED)
    survivors = sorted((n, p) for n, p, s in results if s not in DETECTED)
    per_module = Counter(p for _, p, _ in results)
    killed_per_module = Counter(p for _, p, s in results if s in DETECTED)
    lines = [BEGIN, "",
             f"**Score: {detected} of {len(results)} mutants detected "
             f"({100.0 * detected / len(results):.1f}%)**; by status: "
             + ", ".join(f"{status} {n}" for status, n in counts.most_common()) + ".", "",
             "| module | mutants | detected |", "|---|---|---|"]
    lines += [f"| {p} | {n} | {killed_per_module[p]} |" for p, n in sorted(per_module.items())]
    lines += ["", f"Survivors ({len(survivors)}), as mutmut left them (`mutmut show NAME` for the diff):", ""]
    lines += [f"- `{n}`: `{changed_lines(n, p)}`" for n, p in survivors]
    lines += ["", END]
    text = DOC.read_text() if DOC.exists() else f"# Testing\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + "\n".join(lines) + tail)
    print("\n".join(lines[2:4]))
    unexplained = [n for n, _ in survivors if f"`{n}`" not in tail]
    for name in unexplained:
        print(f"survivor without a fate in {DOC.relative_to(ROOT)}: {name}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
