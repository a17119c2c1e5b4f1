"""What a finished stage search leaves for people: its trial table, ``trials.json`` and Optuna's
plots. ``trials.json`` is written with the manifest, so a finished search prints its table again
without Ray (``run_search`` on an experiment that is done)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

from virface.fileio import write_text_atomic
from virface.errors import VirFaceError
from virface.metrics import INSTANCE_METRICS, format_instance_metrics

TRIALS_FILE = "trials.json"
# Optuna's importance estimate (fANOVA) means nothing on a handful of trials: below this many
# completed trials no importance chart is drawn, and the reason is printed instead.
MIN_TRIALS_FOR_IMPORTANCE = 4

OUTCOME_COMPLETED, OUTCOME_STOPPED, OUTCOME_FAILED = "completed", "stopped early", "failed"


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metric: float | None        # the best epoch's value (what the search selects on)
    epochs: int
    outcome: str                # completed | stopped early | failed
    error: str | None = None

    @property
    def status(self) -> str:
        if self.outcome == OUTCOME_FAILED:
            return f"ERROR: {self.error or '?'}"[:160]
        return self.outcome


def trial_outcome(epochs: int, max_epochs: int, error: Any) -> str:
    if error:
        return OUTCOME_FAILED
    return OUTCOME_COMPLETED if epochs >= max_epochs else OUTCOME_STOPPED


def write_trials(path: str, stage: str, metric: str, mode: str, max_epochs: int,
                 rows: list[TrialRow]) -> None:
    payload = {"stage": stage, "metric": metric, "mode": mode, "max_epochs": max_epochs,
               "trials": [dataclasses.asdict(r) for r in rows]}
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def read_trials(path: str) -> tuple[str, list[TrialRow]]:
    """(metric name, rows) from a stage's trials.json; ([], no metric) when it is absent."""
    if not os.path.exists(path):
        return "", []
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        return payload["metric"], [TrialRow(**row) for row in payload["trials"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VirFaceError(f"{path}: unreadable trial table ({type(exc).__name__}: {exc}); "
                           "delete it, or the whole stage folder to search again") from None


def format_table(stage: str, metric: str, rows: list[TrialRow], *, reused: bool = False,
                 manifest=None, manifest_path: str | None = None, error: str | None = None) -> str:
    lines = [f"== stage {stage}" + (" (finished earlier; reused)" if reused else "")]
    if rows:
        label = f"best {metric}" if metric else "metric"
        lines.append(f"{'trial':<10} {label:>22}  {'epochs':>6}  {'status':<18} params")
        for r in rows:
            value = f"{r.metric:.4f}" if r.metric is not None and math.isfinite(r.metric) else "-"
            params = ", ".join(f"{k}={format_value(v)}" for k, v in r.params.items())
            lines.append(f"{r.trial_id:<10} {value:>22}  {r.epochs:>6}  {r.status:<18} {params}")
    if manifest is not None:
        se = getattr(manifest, "metric_se", None)
        lines.append(f"best: trial {manifest.trial_id} {manifest.metric_name}={manifest.metric_value:.4f}"
                     + (f" ± {se:.4f} (SE over pairs: trials closer than about 2 SE are not told "
                        f"apart by these pairs)" if se is not None else ""))
        close = trials_within_noise(rows, manifest.trial_id, manifest.metric_value, se)
        if close:
            lines.append(f"within noise of the best: {', '.join(close)} (closer than 1.96·√2·SE = "
                         f"{1.96 * math.sqrt(2) * se:.4f}); these pairs do not tell them apart, so "
                         "the choice among them is a coin toss, not a finding")
        accuracies = {k: v for k, v in manifest.test_metrics.items() if k.endswith("_acc")}
        if accuracies:
            lines.append("test (reported, not selected on; ± SE over pairs): "
                         + ", ".join(f"{k}={v:.4f}" + with_se(manifest.test_metrics.get(k + "_se"))
                                     for k, v in sorted(accuracies.items())))
        if manifest.instance_metrics.keys() >= set(INSTANCE_METRICS):
            lines.append("instances (held-out pairs, chosen epoch): "
                         + format_instance_metrics(manifest.instance_metrics))
        lines.append(f"manifest: {manifest_path}")
        lines.append(f"checkpoint: {manifest.checkpoint}")
    if error:
        lines.append(f"FAILED: {error}")
    return "\n".join(lines)


def trials_within_noise(rows: list[TrialRow], best_id: str, best_value: float,
                        se: float | None) -> list[str]:
    """The other trials whose value differs from the best by less than a 95 % interval of the
    difference of two accuracies with this SE each (1.96·√2·SE: unpaired, so conservative for
    trials scored on the same pairs)."""
    if not isinstance(se, (int, float)) or not se > 0 or best_value is None:
        return []
    margin = 1.96 * math.sqrt(2) * se
    return [r.trial_id for r in rows
            if r.trial_id != best_id and r.metric is not None and math.isfinite(r.metric)
            and abs(r.metric - best_value) < margin]


def with_se(se: float | None) -> str:
    return f" ± {se:.4f}" if isinstance(se, (int, float)) else ""


def format_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_optuna_plots(journal: str, study_name: str, out_dir: str, metric: str,
                       say=print) -> list[str]:
    """Optuna's optimisation-history and parameter-importance plots as PNG; returns the paths.
    A plot that cannot mean anything yet is skipped with one line saying why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_matplotlib

    study = optuna.load_study(study_name=study_name,
                              storage=JournalStorage(JournalFileBackend(journal)))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    os.makedirs(out_dir, exist_ok=True)
    plots = [("optimization_history", optuna_matplotlib.plot_optimization_history)]
    if len(completed) >= MIN_TRIALS_FOR_IMPORTANCE:
        plots.append(("param_importances", optuna_matplotlib.plot_param_importances))
    else:
        say(f"param_importances.png not drawn: it needs at least {MIN_TRIALS_FOR_IMPORTANCE} "
            f"completed trials, and this stage has {len(completed)} (stopped-early trials do not count)")
    written = []
    for name, plot in plots:
        with warnings.catch_warnings():
            # Optuna marks its matplotlib plots experimental; we use them on purpose.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = plot(study, target_name=metric)
            except (ValueError, RuntimeError) as exc:
                say(f"{name}.png not drawn: {exc}")
                continue
        path = os.path.join(out_dir, f"{name}.png")
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(path)
    return written
