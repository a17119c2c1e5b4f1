"""The carry-top-K chain against the greedy chain, at an equal budget (issue 12, part 3).

For each seed s, the chain pretrain -> generator -> virface is searched twice through the
project's runner (``virface.search.runner.run_search``), on the built-in synthetic faces:

- ``greedy``: ``--carry_top 1``, each stage passes on its one best trial;
- ``top<K>``: ``--carry_top K``, each stage passes on its K best trials and the next stage
  searches which one to start from (its ``upstream`` parameter).

Both arms search the shipped spaces (search_spaces/<stage>.yaml) with the same trials x epochs x
steps per stage, counted and printed; only the seed differs between seeds: it is the Optuna
sampler's seed (``searcher.seed``) and the trials' training seed (``fixed.seed``) of every
stage. The pretrain search is run once per seed and given to both arms: the carry option does
not change how pretrain is searched (same space, sampler and seeds), only how many of its trials
go on, so running it twice would spend compute on a copy and add noise to the paired difference.
The greedy arm gets pretrain's manifest without its ``carried`` list.

Everything is chosen on validation pairs (synth_*: the stage's selection metric, the hardest
set's accuracy); the figure reported for each arm is the test accuracy (test_synth_*, never
selected on) of the final virface checkpoint, on the same hardest set, beside its validation
value. The headline is the paired test difference top<K> - greedy per seed, in points, from
virface.stats: the mean gain, its standard error over seeds, a 95% interval, the paired t-test's
p-value and the sign of each seed.

Writes into ``--out`` (default docs/carry_top/; with --smoke a new temporary folder):
  results.json   the plan (spaces, budgets), every arm of every seed (its stages' chosen trials,
                 trials, epochs run, lineage, carried trials) and the summary
  table.md       the per-seed table and the summary, as printed

Budget per seed (trials x epochs x steps per stage; ASHA may stop trials earlier, the epochs
actually run are counted too):
  (full)   pretrain 4 x 6 x 40 (once, shared), then per arm generator 2 x 2 x 40 and
           virface 4 x 4 x 40; seeds 1 2 3; K = 2
  --smoke  pretrain 2 x 1 x 3 (shared), per arm generator 2 x 1 x 3 and virface 2 x 1 x 3;
           tiny data; seed 1; the tests use it
The full run trains 960 + 2 x (160 + 640) = 2560 steps per seed, 7680 in all: about 4.4 times
one default chain (1760 steps; 4 min on the quiet 2-core machine, 20-30 min under heavy load),
measured: 43.6 min for the 3 seeds on the 2-core machine, 29 min of it for seed 1 under load
average 6-10 and about 7 min for each of the others at load 2-4 (docs/RESULTS.md). --smoke
took 54 s (65 s with start-up) on the 2-core machine shared with another benchmark.

The full command (run it on a quiet machine; it keeps its experiments in --work-dir):

    python benchmarks/carry_top.py --k 2 --seeds 1 2 3 --out docs/carry_top --work-dir /tmp/carry-top
    python benchmarks/carry_top.py --smoke           # the tests' mode
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAIN = ("pretrain", "generator", "virface")
GREEDY = "greedy"


@dataclass(frozen=True)
class BenchmarkMode:
    """How much to run. None: the shipped YAML's value."""

    name: str
    seeds: tuple[int, ...]
    num_samples: int | None = None
    max_epoch: int | None = None
    steps_per_epoch: int | None = None
    synthetic: dict = field(default_factory=dict)      # SyntheticSpec fields; {}: the defaults


def _smoke_synthetic() -> dict:
    from virface.search.runner import SMOKE_SYNTHETIC

    return dict(SMOKE_SYNTHETIC)


MODES = {
    "full": BenchmarkMode("full", seeds=(1, 2, 3)),
    # Two trials per stage, so that carrying two is a real choice downstream.
    "smoke": BenchmarkMode("smoke", seeds=(1,), num_samples=2, max_epoch=1, steps_per_epoch=3),
}


def carry_arm(k: int) -> str:
    return f"top{k}"


# ----------------------------------------------------------------------------------------------
# Spaces and runs


def seeded_space(mode: BenchmarkMode, stage: str, seed: int) -> dict:
    """The shipped search space of ``stage`` (as a mapping) with the seed's sampler and training
    seed, and the mode's budget."""
    import yaml

    from virface.search.space import default_space_path

    with open(default_space_path(stage), encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data["searcher"] = {**(data.get("searcher") or {}), "seed": seed}
    fixed = data.setdefault("fixed", {})
    fixed["seed"] = seed
    if mode.max_epoch is not None:
        fixed["max_epoch"] = mode.max_epoch
        scheduler = data.get("scheduler") or {}
        if scheduler.get("type", "asha") == "asha" and scheduler.get("grace_period", 1) > mode.max_epoch:
            data["scheduler"] = {**scheduler, "grace_period": mode.max_epoch}
    if mode.steps_per_epoch is not None:
        fixed["steps_per_epoch"] = mode.steps_per_epoch
    if mode.num_samples is not None:
        data["budget"] = {**(data.get("budget") or {}), "num_samples": mode.num_samples}
    return data


def write_spaces(mode: BenchmarkMode, seed: int, space_dir: str) -> dict[str, str]:
    """Stage -> the path of its seeded space file (validated by loading it)."""
    import yaml

    from virface.search.space import load_search_space

    os.makedirs(space_dir, exist_ok=True)
    paths = {}
    for stage in CHAIN:
        path = os.path.join(space_dir, f"{stage}_seed{seed}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(seeded_space(mode, stage, seed), f, sort_keys=False)
        load_search_space(path, stage)
        paths[stage] = path
    return paths


def stage_budget(space_path: str, stage: str) -> dict:
    """What a stage may spend: trials x epochs x steps (steps None: whole epochs)."""
    from virface.search.space import load_search_space

    space = load_search_space(space_path, stage)
    steps = space.fixed.get("steps_per_epoch")
    return {"trials": space.budget.num_samples, "max_epoch": space.max_epochs, "steps_per_epoch": steps,
            "steps": space.budget.num_samples * space.max_epochs * steps if steps else None}


def search_one_stage(work_dir: str, name: str, stage: str, space_path: str, carry_top: int,
                 mode: BenchmarkMode) -> float:
    """Search one stage of experiment ``name`` (its upstream stages' manifests exist); returns
    the wall seconds. A stage with no usable trial is an error."""
    from virface.search.runner import SearchError, SearchOptions, run_search

    data = {"synthetic": dict(mode.synthetic)} if mode.synthetic else {}
    start = time.time()
    outcomes = run_search(SearchOptions(stage=stage, storage=work_dir, name=name, space=space_path,
                                        carry_top=carry_top, data=data, quiet=True, max_failures=0))
    outcome = outcomes[-1]
    if outcome.stage != stage or outcome.manifest is None:
        raise SearchError(f"{name}: stage {stage}: {outcome.error or 'no manifest written'}")
    return time.time() - start


def share_stage(work_dir: str, source: str, target: str, stage: str) -> None:
    """Give experiment ``target`` the finished ``stage`` of ``source`` as a greedy chain sees it:
    its manifest without the carried trials, and its trial table."""
    from virface.search.manifest import manifest_path, read_manifest, write_manifest
    from virface.search.report import TRIALS_FILE

    manifest = read_manifest(manifest_path(work_dir, source, stage))
    write_manifest(replace(manifest, experiment=target, carried=[]), manifest_path(work_dir, target, stage))
    shutil.copyfile(os.path.join(work_dir, source, stage, TRIALS_FILE),
                    os.path.join(work_dir, target, stage, TRIALS_FILE))


def stage_record(work_dir: str, name: str, stage: str) -> dict:
    """A finished stage of an experiment, from its manifest and trial table."""
    from virface.search.manifest import manifest_path, read_manifest
    from virface.search.report import TRIALS_FILE, read_trials

    m = read_manifest(manifest_path(work_dir, name, stage))
    _, rows = read_trials(os.path.join(work_dir, name, stage, TRIALS_FILE))
    return {
        "trial_id": m.trial_id, "metric": m.metric_name, "mode": m.metric_mode,
        "value": m.metric_value, "test_metrics": m.test_metrics, "lineage": m.lineage,
        "params": next((r.params for r in rows if r.trial_id == m.trial_id), {}),
        "upstream_trial": m.trial_upstreams.get(m.trial_id),
        "carried": [{"trial_id": c["trial_id"], "metric_value": c["metric_value"],
                     "upstream": c.get("upstream")} for c in m.carried],
        "trial_upstreams": m.trial_upstreams,
        "trials": [{"trial_id": r.trial_id, "metric": r.metric, "epochs": r.epochs, "outcome": r.outcome,
                    "upstream": r.params.get("upstream")} for r in rows],
        "epochs_run": sum(r.epochs for r in rows),
    }


def arm_record(work_dir: str, name: str, arm: str, seed: int, carry_top: int, wall_s: dict) -> dict:
    """One arm of one seed: every stage, and the final virface checkpoint's figures."""
    from virface.config import TEST_PREFIX

    stages = {stage: stage_record(work_dir, name, stage) for stage in CHAIN}
    final = stages["virface"]
    test_key = TEST_PREFIX + final["metric"]
    if test_key not in final["test_metrics"]:
        raise KeyError(f"{name}: the virface manifest has no {test_key} (test metrics: "
                       f"{sorted(final['test_metrics'])})")
    return {"arm": arm, "seed": seed, "experiment": name, "carry_top": carry_top,
            "val_metric": final["metric"], "val": final["value"],
            "test_metric": test_key, "test": final["test_metrics"][test_key],
            "lineage": final["lineage"], "stages": stages, "wall_s": wall_s}


def run_seed(work_dir: str, mode: BenchmarkMode, seed: int, k: int) -> tuple[list[dict], dict]:
    """Both arms of one seed; returns their records and the stages' budgets."""
    spaces = write_spaces(mode, seed, os.path.join(work_dir, "spaces"))
    budgets = {stage: stage_budget(spaces[stage], stage) for stage in CHAIN}
    top, greedy = f"seed{seed}_{carry_arm(k)}", f"seed{seed}_{GREEDY}"
    walls: dict[str, dict[str, float]] = {carry_arm(k): {}, GREEDY: {}}
    # Pretrain once: both arms' pretrain search would be the same search (see the docstring).
    shared = search_one_stage(work_dir, top, "pretrain", spaces["pretrain"], k, mode)
    walls[carry_arm(k)]["pretrain"] = walls[GREEDY]["pretrain"] = shared
    share_stage(work_dir, top, greedy, "pretrain")
    print(f"[seed {seed}] pretrain (shared): {shared:.0f} s", flush=True)
    for arm, name, carry in ((GREEDY, greedy, 1), (carry_arm(k), top, k)):
        for stage in CHAIN[1:]:
            walls[arm][stage] = search_one_stage(work_dir, name, stage, spaces[stage], carry, mode)
            print(f"[seed {seed}] {arm}: {stage} {walls[arm][stage]:.0f} s", flush=True)
    records = [arm_record(work_dir, greedy, GREEDY, seed, 1, walls[GREEDY]),
               arm_record(work_dir, top, carry_arm(k), seed, k, walls[carry_arm(k)])]
    return records, budgets


# ----------------------------------------------------------------------------------------------
# Summary and table


def summarize(records: list[dict], k: int) -> dict:
    """Per arm: mean test and validation; the paired differences top<K> - greedy per seed, in
    points: mean, std, SE, 95% CI, t and p (paired t over seeds, ``virface.stats``), signs."""
    from virface.stats import paired_over_seeds

    top = carry_arm(k)
    by = {(r["arm"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    test = paired_over_seeds([by[(top, s)]["test"] for s in seeds], [by[(GREEDY, s)]["test"] for s in seeds])
    val = paired_over_seeds([by[(top, s)]["val"] for s in seeds], [by[(GREEDY, s)]["val"] for s in seeds])

    def difference(d: dict) -> dict:
        return {"mean": d["mean"], "std": d["std"], "se": d["se"], "ci95": d["ci95"], "t": d["t"],
                "p_value": d["p_value"], "per_seed": dict(zip(map(str, seeds), d["values"])),
                "signs": d["signs"]}


    def spread(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None}

    arms = {arm: {"test": spread([by[(arm, s)]["test"] for s in seeds]),
                  "val": spread([by[(arm, s)]["val"] for s in seeds])} for arm in (GREEDY, top)}
    return {"seeds": seeds, "arms": arms,
            "test_diff_points": difference(test), "val_diff_points": difference(val)}


def format_budget(budgets: dict, records: list[dict]) -> list[str]:
    lines = ["budget per arm and seed (trials x epochs x steps; pretrain searched once per seed, "
             "shared):"]
    for stage in CHAIN:
        b = budgets[stage]
        steps = f" = {b['steps']} steps" if b["steps"] else ""
        lines.append(f"  {stage:<9} {b['trials']} x {b['max_epoch']} x {b['steps_per_epoch'] or 'all'}{steps}")
    total = sum(budgets[s]["steps"] or 0 for s in CHAIN)
    lines.append(f"  chain     {total} steps per arm, the same for both")
    run: dict[str, list[int]] = {}
    for r in records:
        run.setdefault(r["arm"], []).append(sum(st["epochs_run"] for st in r["stages"].values()))
    lines.append("  epochs actually run (ASHA stops some trials), per seed: "
                 + "; ".join(f"{arm} {run[arm]}" for arm in run))
    return lines


def format_table(records: list[dict], summary: dict, k: int) -> str:
    top = carry_arm(k)
    by = {(r["arm"], r["seed"]): r for r in records}
    metric, test_metric = records[0]["val_metric"], records[0]["test_metric"]
    lines = [f"| seed | greedy test | {top} test | {top} - greedy (points) | greedy val | {top} val | "
             f"{top} lineage |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for s in summary["seeds"]:
        g, t = by[(GREEDY, s)], by[(top, s)]
        d = summary["test_diff_points"]["per_seed"][str(s)]
        lines.append(f"| {s} | {g['test']:.4f} | {t['test']:.4f} | {d:+.2f} | {g['val']:.4f} | "
                     f"{t['val']:.4f} | {' -> '.join(t['lineage'])} |")
    from virface.stats import describe

    arms = summary["arms"]
    lines += ["",
              f"test = {test_metric}, val = {metric} (selected on), of the final virface checkpoint.",
              f"Mean test: greedy {arms[GREEDY]['test']['mean']:.4f}, {top} {arms[top]['test']['mean']:.4f} "
              f"over {len(summary['seeds'])} seed(s).",
              describe(summary["test_diff_points"], f"paired test difference {top} - greedy")
              + " (paired t over seeds; the seeds share the test pairs, so pair sampling is not in "
              "this interval)",
              describe(summary["val_diff_points"], f"paired validation difference {top} - greedy")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main


def prepare_synthetic_cache(mode: BenchmarkMode) -> None:
    """Render (or load) the synthetic faces once, before the first trial."""
    from virface.data.loading import synthetic_cache_dir
    from virface.data.synthetic import SyntheticSpec, load_synthetic

    load_synthetic(SyntheticSpec(**mode.synthetic), cache_dir=synthetic_cache_dir())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the smallest run (the tests use it)")
    parser.add_argument("--k", type=int, default=2, help="the carry arm's --carry_top (>= 2)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the mode's)")
    parser.add_argument("--out", help="where results.json and table.md go (default: docs/carry_top; "
                                      "with --smoke a new temporary folder)")
    parser.add_argument("--work-dir", help="where the experiments go (default: a new temporary "
                                           "folder, kept and printed); must not hold them already")
    args = parser.parse_args(argv)
    if args.k < 2:
        parser.error(f"--k {args.k}: the carry arm must carry at least 2 trials")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    mode = MODES["smoke" if args.smoke else "full"]
    if args.smoke:
        mode = replace(mode, synthetic=_smoke_synthetic())
    seeds = tuple(args.seeds) if args.seeds else mode.seeds
    out_dir = os.path.abspath(args.out or (tempfile.mkdtemp(prefix="carry-top-out-") if args.smoke
                                           else os.path.join(REPO, "docs", "carry_top")))
    work_dir = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="carry-top-"))
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    from virface.search.runner import SearchOptions, init_ray

    print(f"mode {mode.name}: greedy against {carry_arm(args.k)}, seeds {list(seeds)}; "
          f"experiments in {work_dir}", flush=True)
    prepare_synthetic_cache(mode)
    total_start = time.time()
    # One local Ray (every CPU, on loopback) for every search: run_search reuses it.
    started = init_ray(SearchOptions(storage=work_dir), print)
    records, budgets = [], {}
    try:
        for seed in seeds:
            seed_records, budgets = run_seed(work_dir, mode, seed, args.k)
            records += seed_records
    finally:
        if started:
            import ray

            ray.shutdown()
    total_wall = time.time() - total_start

    summary = summarize(records, args.k)
    table = format_table(records, summary, args.k)
    budget_lines = format_budget(budgets, records)
    argv_text = list(argv if argv is not None else sys.argv[1:])
    report = {
        "mode": mode.name,
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), REPO)] + argv_text),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "total_wall_s": total_wall,
        "plan": {"k": args.k, "arms": [GREEDY, carry_arm(args.k)], "seeds": list(seeds),
                 "chain": list(CHAIN), "shared": ["pretrain"], "budgets": budgets,
                 "spaces": {stage: seeded_space(mode, stage, seeds[0]) for stage in CHAIN},
                 "synthetic": mode.synthetic,
                 "seed_sets": "the Optuna sampler's seed (searcher.seed) and fixed.seed of every stage"},
        "records": records,
        "summary": summary,
        "work_dir": work_dir,
    }
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    text = "\n".join(budget_lines) + "\n\n" + table + f"\n\ntotal wall {total_wall:.0f} s ({mode.name} mode)\n"
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text, flush=True)
    print(f"wrote {os.path.join(out_dir, 'results.json')}, {os.path.join(out_dir, 'table.md')}", flush=True)
    return report


if __name__ == "__main__":
    main()
