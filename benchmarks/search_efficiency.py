"""Search efficiency: Optuna TPE + ASHA against random search, at the same compute, judged on
test pairs.

Both methods search the same pretrain-stage space (lr, weight_decay, m, s, label_batch_size on
the built-in synthetic faces, renderer v4, mobilefacenet_s) through the project's own runner
(``virface.search.runner.run_search``), one trial at a time, once per search seed:

- ``random``: Optuna's RandomSampler, no scheduler: every trial trains ``max_epoch`` epochs.
  ``random_trials`` trials, so the budget is B = random_trials * max_epoch epochs.
- ``tpe_asha``: Optuna's TPESampler (seeded, ``n_startup_trials`` random trials first) with
  Tune's ASHA (grace period, reduction factor) stopping weak trials early. It is given enough
  trials to spend at least B; it is judged at B, so both spend the same compute.

Selection is on the validation pairs only, under the rule fixed before the run (``--rule``,
default ``mean_last:3``, virface.selection): a trial's value is the mean of its last 3 epochs'
validation accuracy on synth_cfp_fp, the value ASHA and TPE see (``best_<metric>``), and its
checkpoint is its last epoch. Compute is training epochs run, summed over trials in completion
order. After c epochs, a search's answer is the finished trial (completed, or stopped by ASHA)
with the best value; that trial's checkpoint is scored once on the TEST pairs (20,000
synth_cfp_fp pairs in the full mode, identities apart from training and validation; the trials
themselves only see a token test set). The headlines, per seed and over seeds:

- ``test_difference``: TPE + ASHA's answer minus random search's at the budget B, in test points:
  paired t-test over seeds (virface.stats) and a bootstrap over seeds and test pairs;
- ``ratio_to_reach_random``: the compute TPE + ASHA needs for its answer's test accuracy to reach
  random search's final test accuracy, over B (None: not within its run); and its median.

Writes into ``--out`` (default docs/search_efficiency/): ``summary.json`` (full mode;
``summary_<mode>.json`` otherwise), ``search_efficiency_<mode>.json`` (every epoch of every
trial, per-seed rows), ``best_so_far_<mode>.png`` and Optuna's plots of the first seed's
TPE + ASHA search.

Compute per mode, per method and seed (TPE + ASHA's trials run past the budget; it is judged at B):
  --smoke    1 seed:  random 2 trials x 2 epochs = 4;  TPE+ASHA 3 trials;  3 steps/epoch
  --quick    1 seed:  random 6 trials x 4 epochs = 24; TPE+ASHA 12 trials; 15 steps/epoch
  (full)     5 seeds: random 8 trials x 6 epochs = 48; TPE+ASHA 24 trials; 20 steps/epoch

    python benchmarks/search_efficiency.py            # full: ~50 min on 2 idle cores (~10 min a seed)
    python benchmarks/search_efficiency.py --quick    # ~3 min
    python benchmarks/search_efficiency.py --smoke    # ~40 s; the tests use it
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
import warnings
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = "pretrain"
HARDEST = "synth_cfp_fp"
METRIC = f"{HARDEST}_acc"
DEFAULT_RULE = "mean_last:3"
METHODS = ("random", "tpe_asha")
METHOD_LABELS = {"random": "random search (no early stopping)", "tpe_asha": "Optuna TPE + ASHA"}
METHOD_COLORS = {"random": "tab:blue", "tpe_asha": "tab:orange"}
METHOD_STYLES = {"random": "--", "tpe_asha": "-"}
# The target the issue sets: TPE + ASHA reaches random search's final test accuracy with at most
# a quarter of the compute (median over seeds).
GOAL_RATIO = 1.0 / 4.0

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
    synthetic: dict = field(default_factory=dict)     # what the trials train and validate on
    test_pairs: int = 20000          # test pairs the chosen trials are scored on (synth_cfp_fp)
    n_test_ids: int = 2000

    @property
    def budget_epochs(self) -> int:
        return self.random_trials * self.max_epoch


# The trials' own test sets (scored by every epoch of every trial, never read) are a token: the
# chosen trials are scored once, here, on the large test set of test_spec().
TOKEN_TEST = {"n_test_ids": 20, "test_pairs": 20}

MODES = {
    "smoke": BenchmarkMode(
        "smoke", seeds=(0,), random_trials=2, tpe_trials=3, max_epoch=2, steps_per_epoch=3,
        n_startup_trials=1, grace_period=1, reduction_factor=2,
        synthetic={"n_labeled_ids": 16, "images_per_labeled_id": 6, "n_unlabeled_ids": 0,
                   "n_val_ids": 16, "val_pairs": 100, **TOKEN_TEST}, test_pairs=100, n_test_ids=20),
    "quick": BenchmarkMode(
        "quick", seeds=(0,), random_trials=6, tpe_trials=12, max_epoch=4, steps_per_epoch=15,
        n_startup_trials=4, grace_period=1, reduction_factor=2,
        synthetic={"n_labeled_ids": 100, "images_per_labeled_id": 10, "n_unlabeled_ids": 0,
                   "n_val_ids": 60, "val_pairs": 400, **TOKEN_TEST}, test_pairs=2000, n_test_ids=200),
    "full": BenchmarkMode(
        "full", seeds=(0, 1, 2, 3, 4), random_trials=8, tpe_trials=24, max_epoch=6, steps_per_epoch=20,
        n_startup_trials=5, grace_period=1, reduction_factor=2,
        synthetic={"n_labeled_ids": 200, "images_per_labeled_id": 10, "n_unlabeled_ids": 0,
                   "n_val_ids": 200, "val_pairs": 2000, **TOKEN_TEST}, test_pairs=20000, n_test_ids=2000),
}


# ----------------------------------------------------------------------------------------------
# Search spaces and runs


def test_spec(mode: BenchmarkMode) -> dict:
    """The synthetic spec whose test pairs the chosen trials are scored on: the trials' data
    (same seed, same training and validation faces) with ``mode.test_pairs`` test pairs."""
    return {**mode.synthetic, "n_test_ids": mode.n_test_ids, "test_pairs": mode.test_pairs}


def search_space(mode: BenchmarkMode, method: str, seed: int, rule: str = DEFAULT_RULE) -> dict:
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
        "selection": rule,
        "searcher": searcher,
        "scheduler": scheduler,
        "budget": {"num_samples": num_samples, "time_budget_s": None, "max_concurrent_trials": 1},
        "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        "fixed": {"arch": "mobilefacenet_s", "max_epoch": mode.max_epoch,
                  "steps_per_epoch": mode.steps_per_epoch},
        "parameters": PARAMETERS,
    }


def run_one_search(mode: BenchmarkMode, method: str, seed: int, work_dir: str,
                   rule: str = DEFAULT_RULE) -> dict:
    """Run one search through the project's runner; returns its trials and epoch events."""
    import yaml

    from virface.search.runner import SearchOptions, run_search

    name = f"{method}_seed{seed}"
    space_path = os.path.join(work_dir, f"{name}.yaml")
    with open(space_path, "w") as f:
        yaml.safe_dump(search_space(mode, method, seed, rule), f, sort_keys=False)
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
        # metric: the epoch's validation accuracy; value: the trial's value under the selection
        # rule so far (best_<metric>), what ASHA and TPE saw.
        epochs = [{"epoch": int(r["epoch"]), "metric": _finite(r.get(METRIC)),
                   "value": _finite(r.get(f"best_{METRIC}")),
                   "timestamp": float(r["timestamp"]), "time_total_s": float(r["time_total_s"])}
                  for r in results if "epoch" in r]
        epochs.sort(key=lambda e: e["epoch"])
        trials.append({"trial_id": trial_id, "params": params, "epochs": epochs,
                       "dir": os.path.join(search_dir, entry)})
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
    search's answer at that point: among the trials finished so far (completed, or stopped by
    ASHA), the one with the best value under the selection rule (``best`` and ``trial_id``; None
    before the first trial finishes). Trials in completion order, a trial's epochs in order."""
    curve, compute, best, chosen = [], 0, None, None
    for trial in search["trials"]:
        for i, e in enumerate(trial["epochs"]):
            compute += 1
            final = i == len(trial["epochs"]) - 1
            if final and e["value"] is not None and (best is None or e["value"] > best):
                best, chosen = e["value"], trial["trial_id"]
            curve.append({"compute_epochs": compute, "wall_s": e["timestamp"] - search["search_start"],
                          "best": best, "trial_id": chosen, "epoch": e["epoch"]})
    return curve


def compute_to_reach(curve: list[dict], target: float | None, budget: int | None = None,
                     key: str = "best") -> int | None:
    """Epochs spent when ``curve``'s ``key`` first reaches ``target`` (None: not within budget)."""
    if target is None:
        return None
    for point in curve:
        if budget is not None and point["compute_epochs"] > budget:
            return None
        if point.get(key) is not None and point[key] >= target - 1e-12:
            return point["compute_epochs"]
    return None


def wall_to_reach(curve: list[dict], compute: int | None) -> float | None:
    return None if compute is None else curve[compute - 1]["wall_s"]


def at_budget(curve: list[dict], budget: int) -> dict | None:
    """The curve's last point within ``budget`` epochs: the search's answer at equal compute."""
    inside = [p for p in curve if p["compute_epochs"] <= budget]
    return inside[-1] if inside else None


def best_within(curve: list[dict], budget: int) -> float | None:
    point = at_budget(curve, budget)
    return None if point is None else point["best"]


def chosen_trials(curve: list[dict]) -> list[str]:
    """Every trial that is the search's answer at some point of ``curve`` (in order)."""
    return list(dict.fromkeys(p["trial_id"] for p in curve if p["trial_id"] is not None))


def add_test_accuracy(curve: list[dict], test: dict[str, dict]) -> list[dict]:
    """``curve`` with each point's ``test``: the test accuracy of the trial chosen there
    (``test`` maps trial id -> {"acc": ...})."""
    return [{**p, "test": test[p["trial_id"]]["acc"] if p["trial_id"] is not None else None} for p in curve]


def seed_summary(seed: int, searches: dict[str, dict], budget: int,
                 tests: dict[str, dict[str, dict]] | None = None) -> dict:
    """The per-seed row: each method's answer at the budget (validation value, and its test
    accuracy when ``tests`` holds the chosen trials' test scores), the compute each method needs
    to reach random search's final validation value, and TPE + ASHA's compute to reach random's
    final TEST accuracy over the budget (``ratio_to_reach_random``)."""
    curves = {m: best_so_far_curve(s) for m, s in searches.items()}
    if tests is not None:
        curves = {m: add_test_accuracy(c, tests[m]) for m, c in curves.items()}
    target = best_within(curves["random"], budget)
    row = {"seed": seed, "budget_epochs": budget, "random_best": target}
    for method in METHODS:
        curve, trials = curves[method], searches[method]["trials"]
        needed = compute_to_reach(curve, target, budget)
        end = at_budget(curve, budget)
        row[method] = {
            "compute_to_random_best": needed,
            "wall_s_to_random_best": wall_to_reach(curve, needed),
            "best_within_budget": best_within(curve, budget),
            "chosen_at_budget": end["trial_id"] if end else None,
            "test_at_budget": end.get("test") if end else None,
            "epochs_run": len(curve),
            "trials": len(trials),
            "trials_within_budget": _trials_started_within(trials, budget),
            "search_wall_s": searches[method]["wall_s"],
        }
    r, t = row["random"]["compute_to_random_best"], row["tpe_asha"]["compute_to_random_best"]
    row["ratio_tpe_to_random"] = (t / r) if (r and t) else None
    row["ratio_tpe_to_budget"] = (t / budget) if t else None
    random_test = row["random"]["test_at_budget"]
    needed_test = compute_to_reach(curves["tpe_asha"], random_test, key="test") if tests is not None else None
    row["tpe_compute_to_random_test"] = needed_test
    row["ratio_to_reach_random"] = needed_test / budget if needed_test else None
    return row


def _trials_started_within(trials: list[dict], budget: int) -> int:
    spent, n = 0, 0
    for t in trials:
        if spent >= budget:
            break
        n += 1
        spent += len(t["epochs"])
    return n


def median_ratio(ratios: list[float | None]) -> float | None:
    """Median over seeds, a seed that never reached the target counting as infinitely slow
    (None when that makes the median infinite)."""
    if not ratios:
        return None
    value = float(np.median([math.inf if r is None else r for r in ratios]))
    return value if math.isfinite(value) else None


def test_comparison(rows: list[dict], correct: dict[tuple[int, str], np.ndarray] | None) -> dict | None:
    """TPE + ASHA's answer minus random search's at the budget, test points: the paired t-test
    over seeds, and where per-pair outcomes are given ((seed, method) -> (pairs,) bool), the
    bootstrap over seeds and test pairs."""
    from virface.stats import bootstrap_seeds_and_pairs, min_detectable_effect, paired_over_seeds

    if any(r[m]["test_at_budget"] is None for r in rows for m in METHODS):
        return None
    out = paired_over_seeds([r["tpe_asha"]["test_at_budget"] for r in rows],
                            [r["random"]["test_at_budget"] for r in rows])
    if correct is not None:
        a = np.stack([correct[r["seed"], "tpe_asha"] for r in rows])
        b = np.stack([correct[r["seed"], "random"] for r in rows])
        boot = bootstrap_seeds_and_pairs(a, b, n_boot=2000, seed=0)
        out["seeds_and_pairs"] = {k: boot[k] for k in ("mean", "se", "ci95", "p_value", "n_boot")}
    # From the measured variances: the t-test over seeds and the seeds-and-pairs bootstrap, the
    # larger of the two (one seed has no spread to measure: none).
    out["min_detectable_effect"] = None
    if out["se"] is not None:
        mdes = [min_detectable_effect(out["se"], df=out["n"] - 1)]
        if "seeds_and_pairs" in out:
            mdes.append(min_detectable_effect(out["seeds_and_pairs"]["se"]))
        out["min_detectable_effect"] = max(mdes)
    return out


def overall_summary(rows: list[dict], correct: dict | None = None) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    reached = [r for r in rows if r["tpe_asha"]["compute_to_random_best"] is not None]
    ratios = [r.get("ratio_to_reach_random") for r in rows]
    median = median_ratio(ratios)
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
        "ratio_to_reach_random": ratios,
        "median_ratio_to_reach_random": median,
        "test_difference": test_comparison(rows, correct),
        "goal_ratio": GOAL_RATIO,
        "goal_met": median is not None and median <= GOAL_RATIO + 1e-9,
    }


# ----------------------------------------------------------------------------------------------
# Plots


def plot_best_so_far(per_seed: list[dict], budget: int, path: str, title: str) -> None:
    """The search's answer against compute: its validation value (left) and its test accuracy
    (right). Thin lines per seed, thick for the mean over seeds, both methods on each axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    grid = np.arange(1, budget + 1)
    for ax, key, what in ((axes[0], "best", f"validation {METRIC} (selection rule)"),
                          (axes[1], "test", f"test {METRIC} of the chosen trial")):
        # TPE + ASHA first, so random search's (dashed) lines show where both ran the same trials.
        for method in reversed(METHODS):
            color, label, style = METHOD_COLORS[method], METHOD_LABELS[method], METHOD_STYLES[method]
            stacked = []
            for seed_run in per_seed:
                curve = [p for p in seed_run["curves"][method] if p["compute_epochs"] <= budget]
                x = [p["compute_epochs"] for p in curve]
                y = [p.get(key) if p.get(key) is not None else np.nan for p in curve]
                ax.step(x, y, where="post", color=color, ls=style, alpha=0.35, lw=1)
                values = np.full(budget, np.nan)
                for xi, yi in zip(x, y):
                    values[xi - 1:] = yi
                stacked.append(values)
            with warnings.catch_warnings():      # before any trial finished: all NaN, no line
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(np.vstack(stacked), axis=0) if len(stacked) > 1 else stacked[0]
            ax.step(grid, mean, where="post", color=color, ls=style, lw=2.5,
                    label=label + (f", mean of {len(per_seed)} seeds" if len(per_seed) > 1 else ""))
        ax.axvline(budget * GOAL_RATIO, color="black", ls="--", lw=0.8, label="1/4 of the budget")
        ax.set_xlabel("compute: training epochs run (sum over trials, completion order)")
        ax.set_ylabel(what)
        ax.set_xlim(0, budget + 0.5)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_title("the search's answer: best finished trial on validation", fontsize=9)
    axes[1].set_title("that trial's checkpoint scored on the test pairs", fontsize=9)
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
# Test pairs


def load_test_set(mode: BenchmarkMode):
    """The test pair set the chosen trials are scored on (rendered once, cached)."""
    from virface.data.loading import synthetic_cache_dir
    from virface.data.synthetic import SyntheticSpec, load_synthetic

    faces = load_synthetic(SyntheticSpec(**test_spec(mode)), cache_dir=synthetic_cache_dir())
    return faces.test_pair_sets[HARDEST]


def final_checkpoint(trial_dir: str) -> str:
    """The checkpoint a finished trial passes on: best.pt of its last reported epoch (under
    ``last`` and ``mean_last:K``, that epoch itself)."""
    from virface.search.trial import best_file_in

    reported = sorted(d for d in os.listdir(trial_dir) if d.startswith("checkpoint_"))
    if not reported:
        raise FileNotFoundError(f"{trial_dir}: no checkpoint_* folder (the trial reported none)")
    return best_file_in(os.path.join(trial_dir, reported[-1]))


def score_on_test(checkpoint: str, test_set) -> tuple[float, np.ndarray, float]:
    """(accuracy, per-pair correctness (pairs,) bool, seconds) of a checkpoint on ``test_set``."""
    from virface.checkpoint import load_backbone
    from virface.evaluation.verification import evaluate_pair_set

    start = time.perf_counter()
    backbone, _ = load_backbone(checkpoint, device="cpu")
    result = evaluate_pair_set(backbone, test_set, device="cpu")
    return float(result.acc), np.asarray(result.correct, dtype=bool), time.perf_counter() - start


def score_chosen_trials(search: dict, test_set) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Every trial that is the search's answer at some point, scored once on the test pairs:
    (trial id -> {"acc", "checkpoint", "eval_s"}, trial id -> per-pair correctness)."""
    by_id = {t["trial_id"]: t for t in search["trials"]}
    scores, correct = {}, {}
    for trial_id in chosen_trials(best_so_far_curve(search)):
        path = final_checkpoint(by_id[trial_id]["dir"])
        acc, right, seconds = score_on_test(path, test_set)
        scores[trial_id] = {"acc": acc, "checkpoint": os.path.relpath(path, os.path.dirname(by_id[trial_id]["dir"])),
                            "eval_s": round(seconds, 2)}
        correct[trial_id] = right
    return scores, correct


def measure_eval_cost(mode: BenchmarkMode, test_set) -> dict[str, float]:
    """Seconds one evaluation takes here of the validation set each trial scores every epoch and
    of the test set each chosen trial is scored on (a fresh mobilefacenet_s, this process)."""
    from virface.backbones.registry import build_backbone
    from virface.data.loading import synthetic_cache_dir
    from virface.data.synthetic import SyntheticSpec, load_synthetic
    from virface.evaluation.verification import evaluate_pair_set

    spec = SyntheticSpec(**mode.synthetic)
    val_set = load_synthetic(spec, cache_dir=synthetic_cache_dir()).pair_sets[HARDEST]
    backbone = build_backbone("mobilefacenet_s", feat_len=512, input_size=spec.image_size).eval()
    cost = {}
    for name, pair_set in ((HARDEST, val_set), (f"test_{HARDEST}", test_set)):
        start = time.perf_counter()
        evaluate_pair_set(backbone, pair_set, device="cpu")
        cost[name] = round(time.perf_counter() - start, 2)
    return cost


# ----------------------------------------------------------------------------------------------
# Entry point


def format_table(rows: list[dict], summary: dict) -> str:
    def num(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"{'seed':>4}  {'random val':>10}  {'TPE+ASHA val':>12}  {'random test':>11}  "
             f"{'TPE+ASHA test':>13}  {'TPE+ASHA epochs to random test':>30}  {'ratio':>6}  "
             f"{'wall random / tpe (s)':>21}"]
    for r in rows:
        t = r["tpe_asha"]
        needed = r["tpe_compute_to_random_test"]
        lines.append(f"{r['seed']:>4}  {num(r['random_best'], '{:.4f}'):>10}  "
                     f"{num(t['best_within_budget'], '{:.4f}'):>12}  "
                     f"{num(r['random']['test_at_budget'], '{:.4f}'):>11}  "
                     f"{num(t['test_at_budget'], '{:.4f}'):>13}  "
                     f"{num(needed) if needed else 'not reached':>30}  "
                     f"{num(r['ratio_to_reach_random'], '{:.2f}'):>6}  "
                     f"{r['random']['search_wall_s']:>10.0f} / {t['search_wall_s']:<8.0f}")
    median = summary["median_ratio_to_reach_random"]
    lines.append(f"median ratio (TPE+ASHA epochs for its answer's test accuracy to reach random search's "
                 f"final one / budget): {num(median, '{:.2f}')}; goal <= {GOAL_RATIO:.2f}: "
                 f"{'met' if summary['goal_met'] else 'not met'}")
    diff = summary["test_difference"]
    if diff is not None:
        from virface.stats import describe

        line = describe(diff, f"test {METRIC}, TPE+ASHA - random at equal budget")
        if "seeds_and_pairs" in diff:
            sp = diff["seeds_and_pairs"]
            line += (f"; with pair sampling: 95% CI [{sp['ci95'][0]:+.2f}, {sp['ci95'][1]:+.2f}], "
                     f"p = {sp['p_value']:.3g}")
        lines.append(line)
        if diff["min_detectable_effect"] is not None:
            lines.append(f"minimum detectable effect of that difference (two-sided 5 %, 80 % power): "
                         f"{diff['min_detectable_effect']:.2f} points")
    return "\n".join(lines)


def summary_json(mode: BenchmarkMode, seeds: tuple[int, ...], rule: str, rows: list[dict],
                 summary: dict, eval_cost: dict[str, float]) -> dict:
    """docs/search_efficiency/summary.json, the schema docs/RESULTS.md describes."""
    from virface.selection import parse_rule

    diff = summary["test_difference"] or {}
    sp = diff.get("seeds_and_pairs") or {}
    return {
        "mode": mode.name, "rule": parse_rule(rule).describe(f"validation {METRIC}"), "rule_setting": rule,
        "seeds": list(seeds),
        "budget": {"epochs": mode.budget_epochs, "random_trials": mode.random_trials,
                   "max_epoch": mode.max_epoch, "steps_per_epoch": mode.steps_per_epoch,
                   "tpe_trials": mode.tpe_trials, "asha_grace_period": mode.grace_period,
                   "asha_reduction_factor": mode.reduction_factor},
        "n_val_pairs": {HARDEST: mode.synthetic["val_pairs"]},
        "n_test_pairs": {f"test_{HARDEST}": mode.test_pairs},
        "ratio_to_reach_random": {"per_seed": summary["ratio_to_reach_random"],
                                  "median": summary["median_ratio_to_reach_random"],
                                  "goal": GOAL_RATIO, "goal_met": summary["goal_met"]},
        "test_accuracy_at_budget": {m: [r[m]["test_at_budget"] for r in rows] for m in METHODS},
        "test_difference": {"mean": diff.get("mean"), "std": diff.get("std"), "se": diff.get("se"),
                            "ci95": diff.get("ci95"), "p_value": diff.get("p_value"),
                            "signs": diff.get("signs"), "values": diff.get("values"),
                            "ci95_seeds_and_pairs": sp.get("ci95"),
                            "p_value_seeds_and_pairs": sp.get("p_value"), "unit": "points"},
        "min_detectable_effect": diff.get("min_detectable_effect"),
        "eval_cost_s": eval_cost,
    }


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
    parser.add_argument("--rule", default=DEFAULT_RULE, metavar="RULE",
                        help="selection rule of every trial, fixed before the run: best, last or "
                             f"mean_last:K (default {DEFAULT_RULE})")
    parser.add_argument("--test-pairs", type=int, metavar="N",
                        help="test pairs the chosen trials are scored on (default: the mode's, "
                             "20000 in the full mode; a multiple of 20)")
    parser.add_argument("--val-pairs", type=int, metavar="N",
                        help="validation pairs each trial is scored on every epoch (default: the mode's)")
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


def mode_of(args) -> BenchmarkMode:
    """The mode with the command line's changes, validated (a bad value names its option)."""
    from virface.data.synthetic import SyntheticSpec
    from virface.errors import ConfigError
    from virface.selection import parse_rule

    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.grace_period is not None:
        mode = dataclasses.replace(mode, name=f"{mode.name}_grace{args.grace_period}",
                                   grace_period=args.grace_period)
    if args.test_pairs is not None:
        mode = dataclasses.replace(mode, test_pairs=args.test_pairs)
    if args.val_pairs is not None:
        mode = dataclasses.replace(mode, synthetic={**mode.synthetic, "val_pairs": args.val_pairs})
    try:
        parse_rule(args.rule, "--rule")
        SyntheticSpec(**test_spec(mode))
    except ConfigError as e:
        raise SystemExit(f"search_efficiency: {e}") from None
    return mode


def main(argv=None) -> dict:
    from virface.selection import parse_rule

    args = parse_args(argv)
    mode = mode_of(args)
    rule = parse_rule(args.rule).text
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
          f"and seed; selection rule, fixed before the run: {rule} = "
          f"{parse_rule(rule).describe(f'validation {METRIC}')}; experiments in {work_dir}", flush=True)

    prepare_synthetic_cache(mode)
    test_set = load_test_set(mode)
    eval_cost = measure_eval_cost(mode, test_set)
    print(f"evaluation cost here (s per evaluation): validation {HARDEST} "
          f"({mode.synthetic['val_pairs']} pairs, every epoch of every trial) {eval_cost[HARDEST]:.1f}; "
          f"test {HARDEST} ({mode.test_pairs} pairs, once per chosen trial, a few per search) "
          f"{eval_cost[f'test_{HARDEST}']:.1f}", flush=True)
    started = start_ray(args.num_cpus)
    total_start = time.time()
    per_seed, correct = [], {}
    try:
        for seed in seeds:
            searches, tests = {}, {}
            for method in METHODS:
                searches[method] = run_one_search(mode, method, seed, work_dir, rule)
                tests[method], right = score_chosen_trials(searches[method], test_set)
                print(f"[seed {seed}] {method}: {len(searches[method]['trials'])} trials, "
                      f"{sum(len(t['epochs']) for t in searches[method]['trials'])} epochs, "
                      f"{searches[method]['wall_s']:.0f} s; {len(tests[method])} chosen trial(s) scored "
                      f"on test in {sum(t['eval_s'] for t in tests[method].values()):.0f} s", flush=True)
                searches[method]["test"] = tests[method]
                searches[method]["correct"] = right
            row = seed_summary(seed, searches, mode.budget_epochs, tests)
            for method in METHODS:
                chosen = row[method]["chosen_at_budget"]
                if chosen is not None:
                    correct[seed, method] = searches[method]["correct"][chosen]
            curves = {m: add_test_accuracy(best_so_far_curve(s), tests[m]) for m, s in searches.items()}
            per_seed.append({"seed": seed, "summary": row, "searches": searches, "curves": curves})
        optuna_plots = write_optuna_plots_renamed(per_seed[0]["searches"]["tpe_asha"], out_dir, mode.name)
    finally:
        if started:
            import ray

            ray.shutdown()
    total_wall = time.time() - total_start

    rows = [s["summary"] for s in per_seed]
    summary = overall_summary(rows, correct if len(correct) == 2 * len(rows) else None)
    plot_path = os.path.join(out_dir, f"best_so_far_{mode.name}.png")
    plot_best_so_far(per_seed, mode.budget_epochs, plot_path,
                     f"pretrain search on synthetic faces ({mode.name} mode): budget "
                     f"{mode.budget_epochs} epochs = {mode.random_trials} random trials x "
                     f"{mode.max_epoch} epochs, seeds {list(seeds)}, rule {rule}")
    report = {
        "mode": mode.name,
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + list(argv if argv is not None else sys.argv[1:])),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "total_wall_s": total_wall,
        "eval_cost_s": eval_cost,
        "setup": {
            "stage": STAGE, "metric": METRIC, "rule": rule, "seeds": list(seeds),
            "budget_epochs": mode.budget_epochs, "random_trials": mode.random_trials,
            "tpe_trials": mode.tpe_trials, "max_epoch": mode.max_epoch,
            "steps_per_epoch": mode.steps_per_epoch, "n_startup_trials": mode.n_startup_trials,
            "asha": {"grace_period": mode.grace_period, "reduction_factor": mode.reduction_factor},
            "synthetic": mode.synthetic, "test_synthetic": test_spec(mode), "parameters": PARAMETERS,
            "spaces": {m: search_space(mode, m, seeds[0], rule) for m in METHODS},
        },
        "summary": summary,
        "per_seed": [{"seed": s["seed"], "summary": s["summary"],
                      "methods": {m: {"wall_s": s["searches"][m]["wall_s"],
                                      "error": s["searches"][m]["error"],
                                      "trials": [{k: v for k, v in t.items() if k != "dir"}
                                                 for t in s["searches"][m]["trials"]],
                                      "test": s["searches"][m]["test"],
                                      "curve": s["curves"][m]} for m in METHODS}}
                     for s in per_seed],
        "plots": {"best_so_far": os.path.basename(plot_path),
                  "optuna": [os.path.basename(p) for p in optuna_plots]},
        "work_dir": work_dir,
    }
    json_path = os.path.join(out_dir, f"search_efficiency_{mode.name}.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    summary_path = os.path.join(out_dir, "summary.json" if mode.name == "full" else f"summary_{mode.name}.json")
    with open(summary_path, "w") as f:
        json.dump(summary_json(mode, seeds, rule, rows, summary, eval_cost), f, indent=2)
    print(format_table(rows, summary), flush=True)
    print(f"total wall {total_wall:.0f} s; wrote {json_path}, {summary_path}, {plot_path}, "
          f"{', '.join(optuna_plots) or 'no Optuna plots'}", flush=True)
    return report


if __name__ == "__main__":
    main()
