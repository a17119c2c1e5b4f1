"""The mutation score per group from mutmut's results in mutants/*.meta (run by mutation.sh).

    python benchmarks/mutation_score.py --group=heads ... -- GLOB ...

Killed (a test failed, or the mutant timed out) over all mutants checked; lists the survivors.
"""
from __future__ import annotations

import fnmatch
import json
import re
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 36, -24, 24, 152, 255, 37}
SURVIVED = {0}


def statuses() -> dict[str, int | None]:
    out = {}
    for meta in Path("mutants").rglob("*.py.meta"):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    groups, globs = [a.split("=", 1)[1] for a in argv[:split]], argv[split + 1:]
    codes = {k: v for k, v in statuses().items() if not globs or any(fnmatch.fnmatch(k, g) for g in globs)}
    by_module: dict[str, Counter] = {}
    survivors = []
    for name, code in sorted(codes.items()):
        # mutmut names a function's mutant module.x_func__mutmut_N and a method's
        # module.xǁClassǁmethod__mutmut_N.
        module = re.split(r"\.x(?:_|ǁ)", name, maxsplit=1)[0]
        verdict = "killed" if code in KILLED else "survived" if code in SURVIVED else "not checked" \
            if code is None else "no tests" if code in (5, 33) else f"other ({code})"
        by_module.setdefault(module, Counter())[verdict] += 1
        if verdict == "survived":
            survivors.append(name)
    print(f"groups: {' '.join(groups) or 'all'}")
    print(f"{'module':40s} {'killed':>7s} {'survived':>8s} {'no tests':>8s} {'unchecked':>9s} {'score':>6s}")
    total = Counter()
    for module, c in sorted(by_module.items()):
        total.update(c)
        checked = c["killed"] + c["survived"] + c["no tests"]
        score = f"{100 * c['killed'] / checked:.1f}%" if checked else "-"
        print(f"{module:40s} {c['killed']:7d} {c['survived']:8d} {c['no tests']:8d} {c['not checked']:9d} {score:>6s}")
    checked = total["killed"] + total["survived"] + total["no tests"]
    if checked:
        print(f"{'total':40s} {total['killed']:7d} {total['survived']:8d} {total['no tests']:8d} "
              f"{total['not checked']:9d} {100 * total['killed'] / checked:5.1f}%")
    print("survivors (mutmut show NAME):")
    for name in survivors:
        print("  " + name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
