"""Search efficiency: Optuna TPE + ASHA against random search, at the same compute.

Both methods search the same pretrain-stage space (lr, weight_decay, m, s, label_batch_size on
the built-in synthetic faces, mobilefacenet_s) through the project's own runner
(``virface.search.runner.run_search``), one trial at a time, once per search seed:

- ``random``: Optuna's RandomSampler, no scheduler: every trial trains ``max_epoch`` epochs.
  ``random_trials`` trials, so the budget is B = random_trials * max_epoch epochs.
- ``tpe_asha``: Optuna's TPESampler (seeded, ``n_startup_trials`` random trials first) with
  Tune's ASHA (grace period, reduction factor) stopping weak trials early. It is given enough
  trials to spend at least B; its curve is cut at B, so both spend the same compute.

Compute is training epochs actually run, summed over trials in trial completion order (one
trial at a time, so that is also the order they ran in); wall seconds are recorded too. The
best-so-far accuracy after each epoch is the curve. The headline is the compute each method
needs to reach the best accuracy random search finds in its whole budget (per seed and mean).

Writes into ``--out`` (default docs/search_efficiency/):
  search_efficiency_<mode>.json            every epoch of every trial, per-seed table, summary
  best_so_far_<mode>.png                   best-so-far accuracy against epochs and wall seconds
  optuna_optimization_history_<mode>.png   Optuna's plots of the TPE + ASHA search of the first seed
  optuna_param_importances_<mode>.png

Compute per mode, per method and seed (TPE + ASHA's trials run past the budget; only its first
B epochs count). Wall times were measured on 2 CPU cores shared with another benchmark:
  --smoke    1 seed:  random 2 trials x 2 epochs = 4;  TPE+ASHA 3 trials, cut at 4;   3 steps/epoch
  --quick    1 seed:  random 6 trials x 4 epochs = 24; TPE+ASHA 12 trials, cut at 24; 15 steps/epoch
  (full)     3 seeds: random 8 trials x 6 epochs = 48; TPE+ASHA 24 trials, cut at 48; 20 steps/epoch

    python benchmarks/search_efficiency.py            # full: 18 min
    python benchmarks/search_efficiency.py --quick    # 2 min
    python benchmarks/search_efficiency.py --smoke    # 35 s; the tests use it
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = "pretrain"
METRIC = "synth_cfp_fp_acc"
METHODS = ("random", "tpe_asha")
METHOD_LABELS = {"random": "random search (no early stopping)", "tpe_asha": "Optuna TPE + ASHA"}
METHOD_COLORS = {"random": "tab:blue", "tpe_asha": "tab:orange"}
METHOD_STYLES = {"random": "--", "tpe_asha": "-"}
# The target the issue sets: TPE + ASHA reaches random search's best with <= 1/3 of the compute.
GOAL_RATIO = 1.0 / 3.0

# The searched parameters. No defaults on purpose: with defaults, both searches would start
# from the same hand-picked trial, which says nothing about the searchers.
PARAMETERS = {
    "lr": {"type": "float", "low": 1.0e-3, "high": 1.0, "log": True},
    "weight_decay": {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True},
    "m": {"type": "float", "low": 0.1, "high": 0.7},
    "s": {"type": "float", "low": 8.0, "high": 64.0, "step": 8.0},
    "label_batch_size": {"type": "categorical", "choices": [32, 64, 128]},
}


@dataclass(frozen=True)
class BenchmarkMode:
    """How much to run. B = random_trials * max_epoch epochs per method and seed."""

    name: str
    seeds: tuple[int, ...]
    random_trials: int
    tpe_trials: int                  # enough to spend >= B under ASHA; the curve is cut at B
    max_epoch: int
    steps_per_epoch: int
    n_startup_trials: int            # TPE's random trials before its model is used
    grace_period: int                # ASHA: epochs before a trial may be stopped
    reduction_factor: float
    synthetic: dict = field(default_factory=dict)

    @property
    def budget_epochs(self) -> int:
        return self.random_trials * self.max_epoch


MODES = {
    "smoke": BenchmarkMode(
        "smoke", seeds=(0,), random_trials=2, tpe_trials=3, max_epoch=2, steps_per_epoch=3,
        n_startup_trials=1, grace_period=1, reduction_factor=2,
        synthetic={"n_labeled_ids": 16, "images_per_labeled_id": 6, "n_unlabeled_ids": 0,
                   "n_val_ids": 16, "val_pairs": 100}),
    "quick": BenchmarkMode(
        "quick", seeds=(0,), random_trials=6, tpe_trials=12, max_epoch=4, steps_per_epoch=15,
        n_startup_trials=4, grace_period=1, reduction_factor=2,
        synthetic={"n_labeled_ids": 100, "images_per_labeled_id": 10, "n_unlabeled_ids": 0,
                   "n_val_ids": 60, "val_pairs": 400}),
    "full": BenchmarkMode(
        "full", seeds=(0, 1, 2), random_trials=8, tpe_trials=24, max_epoch=6, steps_per_epoch=20,
        n_startup_trials=5, grace_period=1, reduction_factor=2,
        synthetic={"n_labeled_ids": 200, "images_per_labeled_id": 10, "n_unlabeled_ids": 0,
                   "n_val_ids": 100, "val_pairs": 600}),
}


# ----------------------------------------------------------------------------------------------
# Search spaces and runs


def search_space(mode: BenchmarkMode, method: str, seed: int) -> dict:
    """The search-space YAML (as a mapping) of one method and search seed."""
    if method == "random":
        searcher = {"type": "random", "seed": seed}
        scheduler = {"type": "none"}
        num_samples = mode.random_trials
    else:
        searcher = {"type": "tpe", "seed": seed, "n_startup_trials": mode.n_startup_trials}
        scheduler = {"type": "asha", "grace_period": mode.grace_period,
                     "reduction_factor": mode.reduction_factor}
        num_samples = mode.tpe_trials
    return {
        "metric": {"name": METRIC, "mode": "max"},
        "searcher": searcher,
        "scheduler": scheduler,
        "budget": {"num_samples": num_samples, "time_budget_s": None, "max_concurrent_trials": 1},
        "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        "fixed": {"arch": "mobilefacenet_s", "max_epoch": mode.max_epoch,
                  "steps_per_epoch": mode.steps_per_epoch},
        "parameters": PARAMETERS,
    }


def run_one_search(mode: BenchmarkMode, method: str, seed: int, work_dir: str) -> dict:
    """Run one search through the project's runner; returns its trials and epoch events."""
    import yaml

    from virface.search.runner import SearchOptions, run_search

    name = f"{method}_seed{seed}"
    space_path = os.path.join(work_dir, f"{name}.yaml")
    with open(space_path, "w") as f:
        yaml.safe_dump(search_space(mode, method, seed), f, sort_keys=False)
    start = time.time()
    outcomes = run_search(SearchOptions(stage=STAGE, storage=work_dir, name=name, space=space_path,
                                        data={"synthetic": dict(mode.synthetic)}, quiet=True,
                                        max_failures=0))
    wall_s = time.time() - start
    outcome = outcomes[-1]
    if outcome.error:
        print(f"[{name}] search reported: {outcome.error}", flush=True)
    trials = read_trials(os.path.join(work_dir, name, f"search_{STAGE}"))
    statuses = {row.trial_id: row.status for row in outcome.rows}
    for t in trials:
        t["status"] = statuses.get(t["trial_id"], "unknown")
    return {"name": name, "wall_s": wall_s, "search_start": start, "trials": trials,
            "journal": os.path.join(work_dir, name, STAGE, "optuna.journal"),
            "study_name": f"{name}-{STAGE}", "error": outcome.error}


def read_trials(search_dir: str) -> list[dict]:
    """Every trial's per-epoch results from Tune's ``result.json`` files, in completion order."""
    trials = []
    for entry in sorted(os.listdir(search_dir)):
        result_file = os.path.join(search_dir, entry, "result.json")
        if not entry.startswith(f"{STAGE}_") or not os.path.isfile(result_file):
            continue
        with open(result_file) as f:
            results = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(search_dir, entry, "params.json")) as f:
            params = {k: v for k, v in json.load(f).items() if k in PARAMETERS}
        trial_id = entry[len(STAGE) + 1:]
        epochs = [{"epoch": int(r["epoch"]), "metric": _finite(r.get(METRIC)),
                   "timestamp": float(r["timestamp"]), "time_total_s": float(r["time_total_s"])}
                  for r in results if "epoch" in r]
        epochs.sort(key=lambda e: e["epoch"])
        trials.append({"trial_id": trial_id, "params": params, "epochs": epochs})
    # Completion order: the last result's time, whose resolution is one second; ties are broken
    # by the order Tune created the trials in (with one trial at a time, also the order they ran).
    created = trial_creation_order(search_dir)
    trials.sort(key=lambda t: (t["epochs"][-1]["timestamp"] if t["epochs"] else math.inf,
                               created.get(t["trial_id"], len(created))))
    return trials


def trial_creation_order(search_dir: str) -> dict[str, int]:
    """Trial id -> position in Tune's experiment state (its trials, in the order created)."""
    states = sorted(f for f in os.listdir(search_dir)
                    if f.startswith("experiment_state-") and f.endswith(".json"))
    if not states:
        return {}
    with open(os.path.join(search_dir, states[-1])) as f:
        trial_data = json.load(f)["trial_data"]
    order = {}
    for i, entry in enumerate(trial_data):
        text = entry[0] if isinstance(entry, (list, tuple)) else entry
        trial_id = (json.loads(text) if isinstance(text, str) else text).get("trial_id")
        order.setdefault(str(trial_id), i)
    return order


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Analysis


def best_so_far_curve(search: dict) -> list[dict]:
    """One point per epoch run: cumulative epochs, wall seconds since the search started, and the
    best metric seen so far (trials in completion order, a trial's epochs in order)."""
    curve, compute, best = [], 0, None
    for trial in search["trials"]:
        for e in trial["epochs"]:
            compute += 1
            if e["metric"] is not None and (best is None or e["metric"] > best):
                best = e["metric"]
            curve.append({"compute_epochs": compute, "wall_s": e["timestamp"] - search["search_start"],
                          "best": best, "trial_id": trial["trial_id"], "epoch": e["epoch"]})
    return curve


def compute_to_reach(curve: list[dict], target: float | None, budget: int | None = None) -> int | None:
    """Epochs spent when the best-so-far first reaches ``target`` (None: not within budget)."""
    if target is None:
        return None
    for point in curve:
        if budget is not None and point["compute_epochs"] > budget:
            return None
        if point["best"] is not None and point["best"] >= target - 1e-12:
            return point["compute_epochs"]
    return None


def wall_to_reach(curve: list[dict], compute: int | None) -> float | None:
    return None if compute is None else curve[compute - 1]["wall_s"]


def best_within(curve: list[dict], budget: int) -> float | None:
    inside = [p for p in curve if p["compute_epochs"] <= budget and p["best"] is not None]
    return inside[-1]["best"] if inside else None


def seed_summary(seed: int, searches: dict[str, dict], budget: int) -> dict:
    """The per-seed row: random's best, and the compute each method needs to reach it."""
    curves = {m: best_so_far_curve(s) for m, s in searches.items()}
    target = best_within(curves["random"], budget)
    row = {"seed": seed, "budget_epochs": budget, "random_best": target}
    for method in METHODS:
        curve, trials = curves[method], searches[method]["trials"]
        needed = compute_to_reach(curve, target, budget)
        row[method] = {
            "compute_to_random_best": needed,
            "wall_s_to_random_best": wall_to_reach(curve, needed),
            "best_within_budget": best_within(curve, budget),
            "epochs_run": len(curve),
            "trials": len(trials),
            "trials_within_budget": _trials_started_within(trials, budget),
            "search_wall_s": searches[method]["wall_s"],
        }
    r, t = row["random"]["compute_to_random_best"], row["tpe_asha"]["compute_to_random_best"]
    row["ratio_tpe_to_random"] = (t / r) if (r and t) else None
    row["ratio_tpe_to_budget"] = (t / budget) if t else None
    return row


def _trials_started_within(trials: list[dict], budget: int) -> int:
    spent, n = 0, 0
    for t in trials:
        if spent >= budget:
            break
        n += 1
        spent += len(t["epochs"])
    return n


def overall_summary(rows: list[dict]) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    reached = [r for r in rows if r["tpe_asha"]["compute_to_random_best"] is not None]
    return {
        "seeds": len(rows),
        "tpe_reached_random_best": len(reached),
        "mean_random_best": mean(r["random_best"] for r in rows),
        "mean_tpe_best_within_budget": mean(r["tpe_asha"]["best_within_budget"] for r in rows),
        "mean_random_compute_to_best": mean(r["random"]["compute_to_random_best"] for r in rows),
        # Over the seeds where TPE + ASHA got there; see tpe_reached_random_best.
        "mean_tpe_compute_to_random_best": mean(r["tpe_asha"]["compute_to_random_best"] for r in reached),
        "mean_ratio_tpe_to_random": mean(r["ratio_tpe_to_random"] for r in rows),
        "mean_ratio_tpe_to_budget": mean(r["ratio_tpe_to_budget"] for r in rows),
        "goal_ratio": GOAL_RATIO,
        "goal_met_every_seed": bool(rows) and all(
            r["ratio_tpe_to_random"] is not None and r["ratio_tpe_to_random"] <= GOAL_RATIO + 1e-9
            for r in rows),
    }


# ----------------------------------------------------------------------------------------------
# Plots


def plot_best_so_far(per_seed: list[dict], budget: int, path: str, title: str) -> None:
    """Best-so-far accuracy against compute (left) and wall seconds (right): thin lines per seed,
    thick for the mean over seeds, both methods on each axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_c, ax_w) = plt.subplots(1, 2, figsize=(12, 4.6))
    grid = np.arange(1, budget + 1)
    # TPE + ASHA first, so random search's (dashed) lines show where both ran the same trials:
    # with the same seed, TPE's startup trials are random search's first trials.
    for method in reversed(METHODS):
        color, label, style = METHOD_COLORS[method], METHOD_LABELS[method], METHOD_STYLES[method]
        stacked = []
        for seed_run in per_seed:
            curve = [p for p in seed_run["curves"][method] if p["compute_epochs"] <= budget]
            x = [p["compute_epochs"] for p in curve]
            y = [p["best"] if p["best"] is not None else np.nan for p in curve]
            ax_c.step(x, y, where="post", color=color, ls=style, alpha=0.35, lw=1)
            ax_w.step([p["wall_s"] for p in curve], y, where="post", color=color, ls=style, alpha=0.6, lw=1.2)
            # Best found with at most x epochs: a search that ended before the budget keeps its
            # last value.
            values = np.full(budget, np.nan)
            for xi, yi in zip(x, y):
                values[xi - 1:] = yi
            stacked.append(values)
        mean = np.nanmean(np.vstack(stacked), axis=0) if len(stacked) > 1 else stacked[0]
        ax_c.step(grid, mean, where="post", color=color, ls=style, lw=2.5,
                  label=f"{label}" + (f", mean of {len(per_seed)} seeds" if len(per_seed) > 1 else ""))
        ax_w.plot([], [], color=color, ls=style, lw=1.2, label=label)
    for seed_run in per_seed:
        row = seed_run["summary"]
        if row["random_best"] is not None:
            ax_c.axhline(row["random_best"], color="grey", ls=":", lw=0.8)
        needed = row["tpe_asha"]["compute_to_random_best"]
        if needed is not None:
            ax_c.plot([needed], [row["random_best"]], "o", color=METHOD_COLORS["tpe_asha"], ms=6)
    ax_c.axvline(budget * GOAL_RATIO, color="black", ls="--", lw=0.8, label="1/3 of the budget")
    ax_c.set_xlabel("compute: training epochs run (sum over trials, completion order)")
    ax_c.set_ylabel(f"best-so-far {METRIC}")
    ax_c.set_xlim(0, budget + 0.5)
    ax_c.legend(loc="lower right", fontsize=8)
    ax_c.set_title("against compute (dotted: random's best per seed; dots: TPE+ASHA reaches it)",
                   fontsize=9)
    ax_w.set_xlabel("wall seconds since the search started (one trial at a time)")
    ax_w.set_ylabel(f"best-so-far {METRIC}")
    ax_w.legend(loc="lower right", fontsize=8)
    ax_w.set_title("against wall time (per seed; curves cut at the same epoch budget)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_optuna_plots_renamed(search: dict, out_dir: str, mode: str) -> list[str]:
    """Optuna's own history and importance plots of one search, named for this benchmark."""
    from virface.search.report import write_optuna_plots

    staging = tempfile.mkdtemp(prefix="optuna-plots-", dir=out_dir)
    try:
        written = []
        for path in write_optuna_plots(search["journal"], search["study_name"], staging, METRIC):
            target = os.path.join(out_dir, f"optuna_{os.path.splitext(os.path.basename(path))[0]}_{mode}.png")
            shutil.move(path, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Entry point


def format_table(rows: list[dict], summary: dict) -> str:
    def num(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"{'seed':>4}  {'random best':>11}  {'random: epochs':>14}  {'TPE+ASHA: epochs':>16}  "
             f"{'ratio':>6}  {'TPE+ASHA best':>13}  {'wall random / tpe (s)':>21}"]
    for r in rows:
        t = r["tpe_asha"]
        lines.append(f"{r['seed']:>4}  {num(r['random_best'], '{:.4f}'):>11}  "
                     f"{num(r['random']['compute_to_random_best']):>14}  "
                     f"{num(t['compute_to_random_best']) if t['compute_to_random_best'] else '> ' + str(r['budget_epochs']):>16}  "
                     f"{num(r['ratio_tpe_to_random'], '{:.2f}'):>6}  "
                     f"{num(t['best_within_budget'], '{:.4f}'):>13}  "
                     f"{r['random']['search_wall_s']:>10.0f} / {t['search_wall_s']:<8.0f}")
    lines.append(f"mean ratio (TPE+ASHA / random epochs to random's best): "
                 f"{num(summary['mean_ratio_tpe_to_random'], '{:.2f}')} over the seeds where it got "
                 f"there ({summary['tpe_reached_random_best']}/{summary['seeds']}); goal <= "
                 f"{GOAL_RATIO:.2f}: {'met' if summary['goal_met_every_seed'] else 'not met'} on every seed")
    return "\n".join(lines)


def prepare_synthetic_cache(mode: BenchmarkMode) -> None:
    """Render (or load) the synthetic faces once, before any search, so the first trial of the
    first search does not pay for it in its wall time."""
    from virface.data.loading import synthetic_cache_dir
    from virface.data.synthetic import SyntheticSpec, load_synthetic

    load_synthetic(SyntheticSpec(**mode.synthetic), cache_dir=synthetic_cache_dir())


def start_ray(num_cpus: int) -> bool:
    """Start a local Ray for all the searches (the dashboard, on loopback, is what lets Tune clean
    up ASHA-stopped trials). Returns whether this process started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    # address="local": always a new Ray of our own, even when a `ray start` cluster runs on the
    # machine (a bare ray.init() would try to join that one, and reject num_cpus).
    ray.init(address="local", num_cpus=num_cpus, num_gpus=0, include_dashboard=True,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=False)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 seed, fewer trials and epochs")
    size.add_argument("--smoke", action="store_true", help="the smallest run (the tests use it)")
    parser.add_argument("--seeds", type=int, nargs="+", help="search seeds (default: the mode's)")
    parser.add_argument("--grace-period", type=int,
                        help="ASHA's grace period in epochs (default: the mode's, 1; the shipped "
                             "pretrain.yaml uses 2 since this benchmark); the outputs' names get _grace<N>")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "search_efficiency"),
                        help="where the JSON and PNGs go")
    parser.add_argument("--work-dir", help="where the searches' experiments go (default: a new "
                                           "temporary folder, kept and printed)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs of the local Ray this script starts (if none is running)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.grace_period is not None:
        mode = dataclasses.replace(mode, name=f"{mode.name}_grace{args.grace_period}",
                                   grace_period=args.grace_period)
    seeds = tuple(args.seeds) if args.seeds else mode.seeds
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    work_dir = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="search-efficiency-"))
    os.makedirs(work_dir, exist_ok=True)
    # Trials read the synthetic faces from this cache; Ray's processes inherit it from here.
    os.environ.setdefault("VIRFACE_CACHE_DIR", os.path.join(work_dir, "cache"))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"mode {mode.name}: seeds {list(seeds)}, budget {mode.budget_epochs} epochs per method "
          f"and seed; experiments in {work_dir}", flush=True)

    prepare_synthetic_cache(mode)
    started = start_ray(args.num_cpus)
    total_start = time.time()
    per_seed = []
    try:
        for seed in seeds:
            searches = {}
            for method in METHODS:
                searches[method] = run_one_search(mode, method, seed, work_dir)
                print(f"[seed {seed}] {method}: {len(searches[method]['trials'])} trials, "
                      f"{sum(len(t['epochs']) for t in searches[method]['trials'])} epochs, "
                      f"{searches[method]['wall_s']:.0f} s", flush=True)
            summary = seed_summary(seed, searches, mode.budget_epochs)
            per_seed.append({"seed": seed, "summary": summary, "searches": searches,
                             "curves": {m: best_so_far_curve(s) for m, s in searches.items()}})
        optuna_plots = write_optuna_plots_renamed(per_seed[0]["searches"]["tpe_asha"], out_dir, mode.name)
    finally:
        if started:
            import ray

            ray.shutdown()
    total_wall = time.time() - total_start

    rows = [s["summary"] for s in per_seed]
    summary = overall_summary(rows)
    plot_path = os.path.join(out_dir, f"best_so_far_{mode.name}.png")
    plot_best_so_far(per_seed, mode.budget_epochs, plot_path,
                     f"pretrain search on synthetic faces ({mode.name} mode): budget "
                     f"{mode.budget_epochs} epochs = {mode.random_trials} random trials x "
                     f"{mode.max_epoch} epochs, seeds {list(seeds)}")
    report = {
        "mode": mode.name,
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + list(argv if argv is not None else sys.argv[1:])),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "total_wall_s": total_wall,
        "setup": {
            "stage": STAGE, "metric": METRIC, "seeds": list(seeds),
            "budget_epochs": mode.budget_epochs, "random_trials": mode.random_trials,
            "tpe_trials": mode.tpe_trials, "max_epoch": mode.max_epoch,
            "steps_per_epoch": mode.steps_per_epoch, "n_startup_trials": mode.n_startup_trials,
            "asha": {"grace_period": mode.grace_period, "reduction_factor": mode.reduction_factor},
            "synthetic": mode.synthetic, "parameters": PARAMETERS,
            "spaces": {m: search_space(mode, m, seeds[0]) for m in METHODS},
        },
        "summary": summary,
        "per_seed": [{"seed": s["seed"], "summary": s["summary"],
                      "methods": {m: {"wall_s": s["searches"][m]["wall_s"],
                                      "error": s["searches"][m]["error"],
                                      "trials": s["searches"][m]["trials"],
                                      "curve": s["curves"][m]} for m in METHODS}}
                     for s in per_seed],
        "plots": {"best_so_far": os.path.basename(plot_path),
                  "optuna": [os.path.basename(p) for p in optuna_plots]},
        "work_dir": work_dir,
    }
    json_path = os.path.join(out_dir, f"search_efficiency_{mode.name}.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    print(format_table(rows, summary), flush=True)
    print(f"total wall {total_wall:.0f} s; wrote {json_path}, {plot_path}, "
          f"{', '.join(optuna_plots) or 'no Optuna plots'}", flush=True)
    return report


if __name__ == "__main__":
    main()
