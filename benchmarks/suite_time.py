"""Where the test suite's time goes: each test's wall time and the CPU time the whole machine
spent during it (every process: pytest, the drivers it starts, Ray's processes), then the
suite's total against what the cores can give.

Run the tests one at a time (no xdist), on an otherwise idle machine: the CPU figure is the
machine's, so anything else running is counted too.

    python benchmarks/suite_time.py                  # the whole suite (about 25 min on 2 cores)
    python benchmarks/suite_time.py -m slow          # the end-to-end tests only
    python benchmarks/suite_time.py -m slow --top 10 tests/test_search_faults.py

Arguments other than --top and --out go to pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pytest


def machine_cpu_s() -> float:
    """CPU seconds the machine has spent busy (user, nice, system, irq, softirq) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


class SuiteTime:
    """A pytest plugin: per test (setup, call and teardown together), wall and machine CPU."""

    def __init__(self):
        self.rows: list[tuple[str, float, float]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        cpu, wall = machine_cpu_s(), time.monotonic()
        yield
        self.rows.append((item.nodeid, time.monotonic() - wall, machine_cpu_s() - cpu))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=30, help="how many tests to list (default 30)")
    parser.add_argument("--out", help="write every test's figures as JSON here")
    args, pytest_args = parser.parse_known_args(argv)
    if not hasattr(os, "sysconf") or not os.path.exists("/proc/stat"):
        print("suite_time: needs Linux's /proc/stat", file=sys.stderr)
        return 2
    plugin = SuiteTime()
    cpu, wall = machine_cpu_s(), time.monotonic()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", *pytest_args], plugins=[plugin])
    cpu, wall = machine_cpu_s() - cpu, time.monotonic() - wall
    cores = os.cpu_count() or 1
    rows = sorted(plugin.rows, key=lambda r: -r[2])
    print(f"\n{len(rows)} tests in {wall:.0f} s; the machine was busy {cpu:.0f} CPU-s "
          f"({cpu / wall:.2f} of its {cores} cores on average)")
    print(f"at best, with every core busy all the time: {cpu / cores / 60:.1f} min for this work")
    print(f"\n{'CPU s':>7} {'wall s':>7} {'cores':>5}  test (the {min(args.top, len(rows))} costliest)")
    for name, seconds, used in rows[:args.top]:
        print(f"{used:7.1f} {seconds:7.1f} {used / max(seconds, 1e-9):5.2f}  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"wall_s": wall, "cpu_s": cpu, "cores": cores,
                       "tests": [{"test": n, "wall_s": w, "cpu_s": c} for n, w, c in plugin.rows]}, f, indent=1)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
