"""Judge mutmut's mutants of some functions with tests you name, in one process, and show the
survivors' diffs. For when ``mutmut run`` reports "no tests" for a function its incremental
statistics have not attributed to any test (a function new since the last full run), or to
re-judge survivors after writing tests, without regenerating mutants.

    make mutation GROUPS=conclusion          # once: mutants/ with the mutated copies
    cp tests/test_stage_conclusion.py mutants/tests/    # tests written since
    python benchmarks/mutation_judge.py virface.search.runner.x_conclude_stage \\
        --out judged.json -- tests/test_stage_conclusion.py

Each mutant is switched on through mutmut's trampoline (``MUTANT_UNDER_TEST``; the mutated
module reads it at every call), the tests run with ``pytest -x`` inside ``mutants/``, and a
failing run kills the mutant. Prints the score and each survivor's changed lines.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import functools
import io
import json
import multiprocessing
import os
import re
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mutant_names(mutants_dir: str, prefix: str) -> list[str]:
    """Every mutant of the functions whose mangled names start with ``prefix`` (module dotted,
    then ``x_<function>`` or ``xǁ<Class>ǁ<method>``), in the mutated copy of their module."""
    if re.search(r"__mutmut_\d+$", prefix):       # one mutant, named in full
        return [prefix]
    module, _, function = prefix.partition(".x")
    path = os.path.join(mutants_dir, *module.split(".")) + ".py"
    with open(path, encoding="utf-8") as f:
        found = set(re.findall(r"\b(x" + re.escape(function) + r"\w*__mutmut_\d+)\b", f.read()))
    return sorted((f"{module}.{name}" for name in found), key=lambda n: (len(n), n))


@functools.lru_cache(maxsize=None)
def _functions(path: str) -> dict[str, list[str]]:
    """Each function of a mutated module by name, its source lines (parsed once: a mutated
    module holds every mutant and takes seconds to parse)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    return {node.name: lines[node.lineno - 1:node.end_lineno]
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}


def changed_lines(mutants_dir: str, name: str) -> str:
    """The lines a mutant changes, against the original function of the mutated module."""
    module, _, short = name.rpartition(".")
    functions = _functions(os.path.join(os.path.abspath(mutants_dir), *module.split(".")) + ".py")
    original = functions.get(short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", [])
    diff = [line for line in difflib.unified_diff(original, functions.get(short, []), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---")) and not line[1:].lstrip().startswith("def ")]
    return " | ".join(line[0] + " " + line[1:].strip() for line in diff)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tests = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefixes", nargs="*", metavar="FUNCTION",
                   help="mangled function prefix, e.g. virface.search.runner.x_conclude_stage, or one "
                   "mutant's full name (e.g. the survivors of an earlier run)")
    p.add_argument("--from-file", help="also judge the mutants named in this file, one a line")
    p.add_argument("--mutants", default=os.path.join(REPO, "mutants"), help="mutmut's mutants/ folder")
    p.add_argument("--timeout", type=int, default=300,
                   help="seconds the tests may run under one mutant before it counts as killed")
    p.add_argument("--out", help="write {mutant: pytest exit code} as JSON here")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not tests:
        p.error("name the tests after --")
    os.chdir(args.mutants)
    sys.path.insert(0, os.getcwd())               # the mutated package, not the installed one
    import pytest

    prefixes = list(args.prefixes)
    if args.from_file:
        with open(args.from_file, encoding="utf-8") as f:
            prefixes += [line.strip() for line in f if line.strip()]
    names = [n for prefix in prefixes for n in mutant_names(".", prefix)]
    pytest_args = ["-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", *tests]

    def too_long(signum, frame):
        raise TimeoutError(f"the tests ran past {args.timeout} s under this mutant")

    def run(mutant: str) -> int:
        """pytest's exit code under ``mutant``. A mutant that makes the tests hang (a rank of a
        two-process test waiting forever on a collective the mutant broke) is stopped after
        --timeout seconds, its child processes killed, and counts as killed, as in mutmut."""
        os.environ["MUTANT_UNDER_TEST"] = mutant
        signal.signal(signal.SIGALRM, too_long)
        signal.alarm(args.timeout)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return int(pytest.main(pytest_args))
        finally:
            signal.alarm(0)
            for child in multiprocessing.active_children():
                child.kill()

    if run("") != 0:
        print("the tests fail without any mutant: fix them first", file=sys.stderr)
        return 2
    codes = {}
    for k, name in enumerate(names, 1):
        codes[name] = run(name)
        print(f"{k}/{len(names)} {name}: {'killed' if codes[name] else 'SURVIVED'}", flush=True)
    os.environ["MUTANT_UNDER_TEST"] = ""
    survivors = [n for n, code in codes.items() if code == 0]
    killed = len(codes) - len(survivors)
    print(f"\n{killed} killed, {len(survivors)} survived of {len(codes)}"
          + (f" ({100 * killed / len(codes):.1f} %)" if codes else ""))
    for name in survivors:
        print(f"  {name}: {changed_lines('.', name)}")
    if args.out:
        with open(os.path.join(REPO, args.out) if not os.path.isabs(args.out) else args.out, "w") as f:
            json.dump(codes, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
