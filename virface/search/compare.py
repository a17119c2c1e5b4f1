"""A fair comparison, built in: ``virface-search --stage virface --compare virclass,baseline``.

1. Every arm is searched from the same upstream weights (virclass and baseline start from
   pretrain's best checkpoint; virface from the generator's, whose backbone and head are that
   same checkpoint, frozen), on the same data, with the same budget: ``--stage``'s trials x
   epochs x steps, counted and printed. Each arm's best trial is chosen on validation pairs.
2. Each arm's winner is trained again with ``--seeds`` seeds (1..N; the search used seed 0),
   from the same upstream checkpoint. Each run's figure is its test accuracy at its best
   validation epoch, on the hardest test pair set.
3. The paired test differences to the baseline, seed by seed (``virface.stats.paired_over_seeds``):
   the mean gain, its standard error over seeds, a 95% interval, the two-sided paired t-test's
   p-value and each seed's sign, as a table, a plot and
   ``<storage>/<name>/comparison/comparison.json``. Every seed is scored on the same test pairs,
   so this interval leaves out pair sampling; a second interval resamples seeds and test pairs
   together (``bootstrap_seeds_and_pairs``; each run's best checkpoint is scored again on the
   hardest test set for its per-pair correctness).

The baseline (the ``baseline`` stage) is the pretrained model trained on for as long on the
labeled faces alone, searching the same lr, margin and labeled-feature dropout: a method must
beat a tuned baseline, not an untuned one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import threading
from dataclasses import replace
from typing import Any

from virface.config import TEST_PREFIX
from virface.errors import ConfigError
from virface.fileio import write_text_atomic
from virface.search.lock import ExperimentLock
from virface.search.manifest import StageManifest, read_manifest
from virface.search.runner import (SearchError, SearchInterrupted, SearchOptions, base_train_config, init_ray,
                                   run_search, search_environment, sigterm_as_sigint, stage_space)
from virface.stage_table import STAGES
from virface.stats import bootstrap_seeds_and_pairs, describe, paired_over_seeds

COMPARISON_DIR = "comparison"
BASELINE = "baseline"
# Budget keys a comparison sets alike for every arm (the search's own, not the model's).
BUDGET_FIELDS = ("max_epoch", "steps_per_epoch")


def comparison_arms(options: SearchOptions) -> list[str]:
    arms = [options.stage] + [a.strip() for a in (options.compare or "").split(",") if a.strip()]
    for arm in arms:
        if arm not in STAGES:
            raise ConfigError(f"compare: {arm!r} is not one of {list(STAGES)}")
        if not STAGES[arm].trains_backbone:
            raise ConfigError(f"compare: stage {arm} does not train the backbone; there is nothing "
                              f"to verify on test pairs")
    if len(set(arms)) != len(arms):
        raise ConfigError(f"compare: an arm is named twice in {arms}")
    if BASELINE not in arms:
        raise ConfigError(f"compare: the differences are to the baseline; add it: --compare "
                          f"{','.join(arms[1:] + [BASELINE])}")
    return arms


def equal_budget(options: SearchOptions, arms: list[str]) -> dict[str, Any]:
    """--stage's trials x epochs x steps, which every arm gets; an arm that searches one of them
    cannot be held to it."""
    main = stage_space(options, options.stage)
    budget = {"num_samples": main.budget.num_samples}
    for key in BUDGET_FIELDS:
        budget[key] = main.fixed.get(key)
    for arm in arms:
        searched = set(stage_space(options, arm).parameter_names) & set(BUDGET_FIELDS)
        if searched:
            raise ConfigError(f"compare: the {arm} space searches {sorted(searched)}; a comparison "
                              f"gives every arm the same, so fix them in its 'fixed' section")
    return budget


def run_comparison(options: SearchOptions, say=print) -> dict[str, Any]:
    """Search every arm, retrain the winners with seeds, and report; returns comparison.json's
    content (printed from the file when the comparison finished earlier)."""
    say = (lambda text: None) if options.quiet else say
    folder = os.path.join(options.storage, options.name, COMPARISON_DIR)
    result_path = os.path.join(folder, "comparison.json")
    arms = comparison_arms(options)
    if os.path.exists(result_path):
        say(f"the comparison finished earlier: {result_path}")
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    budget = equal_budget(options, arms)
    steps = budget["num_samples"] * (budget["max_epoch"] or 0) * (budget["steps_per_epoch"] or 0)
    say(f"comparing {', '.join(arms)}: each arm {budget['num_samples']} trial(s) x up to "
        f"{budget['max_epoch']} epoch(s) x {budget['steps_per_epoch']} step(s) = at most {steps} "
        f"training steps, chosen on validation; winners retrained with seeds 1..{options.seeds}")
    with ExperimentLock(os.path.join(options.storage, options.name)), search_environment():
        started = init_ray(options, say)
        try:
            with sigterm_as_sigint(f"stopping: the search's state is being saved; continue it "
                                   f"with {options.how_to_resume()}") as interrupted:
                manifests = {}
                for arm in arms:
                    outcome = run_search(replace(options, stage=arm, compare=None, budget_overrides=budget),
                                         say=say)[-1]
                    if outcome.manifest is None:
                        raise SearchError(f"compare: the {arm} search found no usable trial: {outcome.error}")
                    manifests[arm] = outcome.manifest
                runs = {arm: retrain(options, arm, manifests[arm], say, interrupted) for arm in arms}
        finally:
            if started:
                import ray

                ray.shutdown()
    metric = _hardest_test_metric(runs[BASELINE])
    correct = per_pair_correctness(options, runs, metric, say)
    result = summarise(arms, budget, manifests, runs, options.seeds, correct)
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(result_path, json.dumps(result, indent=2) + "\n")
    write_text_atomic(os.path.join(folder, "comparison.md"), comparison_table(result) + "\n")
    plot_comparison(result, os.path.join(folder, "paired_differences.png"))
    return result


def retrain(options: SearchOptions, arm: str, manifest: StageManifest, say,
            interrupted: threading.Event | None = None) -> list[dict[str, Any]]:
    """The arm's winning config trained with seeds 1..N from the same upstream checkpoint; per
    seed, the best validation epoch's metrics (its test figures among them)."""
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from virface.checkpoint import load_checkpoint
    from virface.search.callbacks import TrialProgress
    from virface.search.trial import (TrialSetup, best_checkpoint_of, checkpoint_retention, concurrent_trials,
                                      reuses_actors, run_trial, trial_resources)

    experiment = os.path.join(options.storage, options.name, COMPARISON_DIR)
    space = stage_space(replace(options, stage=arm), arm)
    winner = {k: v for k, v in manifest.config.items()
              if k not in ("method", "pretrained_file", "resume_file", "snapshot_prefix", "seed")}
    setup = TrialSetup(stage=arm, base_config={**base_train_config(options), **winner},
                       upstream_checkpoint=manifest.upstream, tb_root=os.path.join(experiment, arm, "tb"),
                       train_storage=experiment, metric=manifest.metric_name, mode=manifest.metric_mode,
                       resources=space.resources, worker_max_failures=options.max_failures)
    seeds = list(range(1, options.seeds + 1))
    say(f"[{arm}] retraining the winner (trial {manifest.trial_id}) with seeds {seeds}")
    name = f"retrain_{arm}"
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup))
    if options.resume and tune.Tuner.can_restore(os.path.join(experiment, name)):
        tuner = tune.Tuner.restore(os.path.join(experiment, name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials(
                                            space.resources, space.budget.max_concurrent_trials,
                                            ray.cluster_resources()),
                                        trial_dirname_creator=lambda t: f"{arm}_seed{t.config['seed']}",
                                        reuse_actors=reuses_actors(space.resources)),
            run_config=tune.RunConfig(
                name=name, storage_path=experiment, verbose=0,
                failure_config=tune.FailureConfig(max_failures=options.max_failures),
                checkpoint_config=checkpoint_retention(),
                callbacks=[TrialProgress(arm, manifest.metric_name, ["seed"], len(seeds),
                                         space.max_epochs, 1, setup.tb_root, print_lines=not options.quiet),
                           CSVLoggerCallback(), JsonLoggerCallback()]))
    results = tuner.fit()
    if interrupted is not None and interrupted.is_set():
        raise SearchInterrupted(f"compare: retraining the {arm} winner was interrupted; its state is "
                                f"saved: continue with the same command and --resume")
    runs = []
    for result in results:
        if result.error is not None:
            raise SearchError(f"compare: retraining the {arm} winner failed: {result.error}")
        path, value = best_checkpoint_of(result, manifest.metric_name)
        metrics = load_checkpoint(path)["metrics"]
        runs.append({"seed": result.config["seed"], "best_epoch": metrics["epoch"], "val": value,
                     "checkpoint": path,
                     **{k: v for k, v in metrics.items() if k.startswith(TEST_PREFIX)}})
    return sorted(runs, key=lambda r: r["seed"])


def _hardest_test_metric(runs: list[dict[str, Any]]) -> str:
    from virface.metrics import hardest_pair_set

    names = sorted({k[len(TEST_PREFIX):-len("_acc")] for k in runs[0] if k.startswith(TEST_PREFIX) and k.endswith("_acc")})
    if not names:
        raise SearchError("compare: the runs reported no test pair set; give --test NAME=PATH (the "
                          "built-in synthetic faces have their own)")
    return f"{TEST_PREFIX}{hardest_pair_set(names)}_acc"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def per_pair_correctness(options: SearchOptions, runs: dict[str, list[dict[str, Any]]], metric: str,
                     say) -> dict[str, Any]:
    """Per arm, (seeds, pairs) bool: each run's best checkpoint scored again on the test pair set
    ``metric`` names, pair by pair, in seed order (what the bootstrap over pairs needs)."""
    import numpy as np

    from virface.checkpoint import load_backbone
    from virface.config import TrainConfig
    from virface.data.loading import build_stage_data
    from virface.evaluation.verification import evaluate_pair_set

    name = metric[len(TEST_PREFIX):-len("_acc")]
    _, state = load_backbone(runs[BASELINE][0]["checkpoint"])
    config = TrainConfig.from_dict({**base_train_config(options), "input_size": state["model"]["input_size"]})
    pair_set = build_stage_data(config).test_pair_sets[name]
    say(f"scoring every retrained run on the {len(pair_set)} {name} test pairs, pair by pair")
    correct = {}
    for arm, arm_runs in runs.items():
        rows = []
        for run in arm_runs:
            backbone, _ = load_backbone(run["checkpoint"])
            rows.append(evaluate_pair_set(backbone, pair_set).correct)
        correct[arm] = np.stack(rows)
    return correct


def summarise(arms: list[str], budget: dict[str, Any], manifests: dict[str, StageManifest],
              runs: dict[str, list[dict[str, Any]]], seeds: int,
              correct: dict[str, Any] | None = None) -> dict[str, Any]:
    """comparison.json's content. ``correct``: per arm, (seeds, pairs) bool on the reported test
    set, in seed order; when given, each difference also gets an interval over seeds and pairs."""
    metric = _hardest_test_metric(runs[BASELINE])
    result: dict[str, Any] = {"arms": arms, "budget": budget, "seeds": seeds,
                              "select_on": manifests[BASELINE].metric_name, "report_on": metric, "by_arm": {},
                              "differences_to_baseline": {}}
    for arm in arms:
        values = [100.0 * r[metric] for r in runs[arm]]
        mean, std = _mean_std(values)
        m = manifests[arm]
        result["by_arm"][arm] = {"winner_trial": m.trial_id, "val_metric": m.metric_name, "val_value": m.metric_value,
                                 "winner_config": {k: m.config.get(k) for k in sorted(m.config)
                                                   if k not in ("val", "test", "synthetic")},
                                 "runs": runs[arm], "test_points": values, "test_mean": mean, "test_std": std}
    base = {r["seed"]: r[metric] for r in runs[BASELINE]}
    for arm in arms:
        if arm == BASELINE:
            continue
        d = paired_over_seeds([r[metric] for r in runs[arm]], [base[r["seed"]] for r in runs[arm]])
        result["differences_to_baseline"][arm] = {
            "per_seed": d["values"], "mean": d["mean"], "std": d["std"], "se": d["se"],
            "ci95": d["ci95"], "t": d["t"], "p_value": d["p_value"], "signs": d["signs"],
            "test": "paired t over seeds", "verdict": describe(d, f"{arm} - {BASELINE}")}
        if correct is not None:
            boot = bootstrap_seeds_and_pairs(correct[arm], correct[BASELINE])
            result["differences_to_baseline"][arm]["seeds_and_pairs"] = {
                **boot, "test": f"bootstrap over seeds and test pairs ({boot['n_boot']} draws)",
                "verdict": describe(boot, f"{arm} - {BASELINE}, seeds and pairs resampled")}
    return result


def comparison_table(result: dict[str, Any]) -> str:
    metric = result["report_on"]
    lines = [f"Comparison: best trial per arm chosen on {result['select_on']} (validation); "
             f"{metric} (test, points) of the winner retrained with {result['seeds']} seeds, at its "
             f"best validation epoch. Budget per arm: {result['budget']}.", "",
             "| arm | winner | val | test mean ± std | paired diff to baseline ± SE | 95% CI | p | signs |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for arm, row in result["by_arm"].items():
        diff = result["differences_to_baseline"].get(arm)
        if diff is None:
            cells = "— | | |"
        elif diff["se"] is None:
            cells = f"{diff['mean']:+.2f} (one seed) | | |"
        else:
            cells = (f"{diff['mean']:+.2f} ± {diff['se']:.2f} | [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}] | "
                     f"{diff['p_value']:.3g} |")
        lines.append(f"| {arm} | {row['winner_trial']} | {row['val_value']:.4f} | "
                     f"{row['test_mean']:.2f} ± {row['test_std']:.2f} | {cells} {diff['signs'] if diff else ''} |")
    lines += ["", "Paired t-test over seeds (points): SE = std / sqrt(seeds); every seed is scored on "
              "the same test pairs, so pair sampling is not in this interval."]
    for d in result["differences_to_baseline"].values():
        lines.append(d["verdict"])
        if "seeds_and_pairs" in d:
            lines.append(d["seeds_and_pairs"]["verdict"] + f" ({d['seeds_and_pairs']['test']})")
    return "\n".join(lines)


def plot_comparison(result: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["differences_to_baseline"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(arms), 3.4))
    for i, arm in enumerate(arms):
        d = result["differences_to_baseline"][arm]
        ax.scatter([i] * len(d["per_seed"]), d["per_seed"], color="tab:blue", zorder=3)
        if d["ci95"] is not None:
            lo, hi = d["ci95"]
            ax.errorbar([i + 0.15], [d["mean"]], yerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o",
                        color="black", capsize=4, zorder=3)
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel(f"paired diff to baseline, points\n({result['report_on']})")
    ax.set_title("per seed (dots); mean and 95% CI over seeds (black)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
