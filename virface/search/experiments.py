"""What is under a storage folder: ``virface-search --list``.

Each experiment (``<storage>/<name>/``) with its stages in chain order and their status:
finished (a manifest: the best trial, its value, the test figures), running (the search folder
of a stage without a manifest while the experiment's driver lock is held by a live driver, whose
pid and host are shown) or interrupted (the same without a live driver: the ``--resume`` command
that continues it is shown). Read from the files the search writes; no Ray. Under a storage URI
(``s3://...``) each experiment's records are fetched into the driver's local copy first
(virface.storage.ExperimentMirror) and read there; its lock and Tune folders are looked at
remotely.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from virface import storage as storages
from virface.errors import VirFaceError
from virface.search.lock import describe_holder, lock_holder
from virface.search.manifest import MANIFEST_NAME, StageManifest, read_manifest
from virface.search.report import TRIALS_FILE, read_trials

RESUME_COMMAND_FILE = "resume_command.txt"      # written by the driver (virface.search.runner)
from virface.stage_table import STAGES

FINISHED, RUNNING, INTERRUPTED = "finished", "running", "interrupted"


@dataclass
class StageStatus:
    stage: str
    status: str                         # finished | running | interrupted | unreadable
    manifest: StageManifest | None = None
    trials: int = 0
    note: str = ""                      # the resume command, the lock holder, or what is wrong


@dataclass
class ExperimentSummary:
    name: str
    folder: str
    stages: list[StageStatus] = field(default_factory=list)
    driver: str | None = None           # the live driver holding the experiment, described


def resume_command(storage: str, name: str, stage: str, shown: str | None = None) -> str:
    """The command the experiment's last driver recorded (its own, with --resume), else the
    plain one (to which the data and run-size options it was started with must be added).
    ``shown``: the --storage to name, when ``storage`` is the local copy of a URI's records."""
    try:
        with open(os.path.join(storage, name, RESUME_COMMAND_FILE), encoding="utf-8") as f:
            recorded = f.read().strip()
    except OSError:
        recorded = ""
    return recorded or (shlex.join(["virface-search", "--stage", stage, "--name", name, "--storage", shown or storage,
                                    "--resume"]) + " (with the options it was started with)")


def summarise_experiment(storage: str, name: str, remote: str | None = None) -> ExperimentSummary:
    """``storage``: the folder of the records; ``remote``: the storage URI they are the local
    copy of (its lock and Tune folders are looked at there), or None."""
    folder = os.path.join(storage, name)
    location = storages.join(remote, name) if remote else folder
    holder, alive = lock_holder(location)
    summary = ExperimentSummary(name, folder, driver=describe_holder(holder) if holder and alive else None)
    for stage in STAGES:
        stage_dir = os.path.join(folder, stage)
        manifest_file = os.path.join(stage_dir, MANIFEST_NAME)
        if os.path.exists(manifest_file):
            try:
                manifest = read_manifest(manifest_file)
                _, rows = read_trials(os.path.join(stage_dir, TRIALS_FILE))
            except VirFaceError as exc:
                summary.stages.append(StageStatus(stage, "unreadable", note=str(exc)))
                continue
            summary.stages.append(StageStatus(stage, FINISHED, manifest, len(rows)))
        elif storages.exists(storages.join(location, f"search_{stage}")):
            if summary.driver:
                summary.stages.append(StageStatus(stage, RUNNING, note=f"driver {summary.driver}"))
            else:
                shown = storages.without_credentials(remote) if remote else None
                summary.stages.append(StageStatus(stage, INTERRUPTED,
                                                  note="continue: " + resume_command(storage, name, stage, shown)))
    return summary


def list_experiments(storage: str, remote: str | None = None) -> list[ExperimentSummary]:
    """Every experiment under ``storage`` that holds at least one stage, by name. ``remote``: a
    storage URI whose experiments are listed, their records fetched into ``storage`` first."""
    if remote is not None:
        storages.check_reachable(remote)
        summaries = []
        for name in storages.list_folders(remote):
            storages.ExperimentMirror(os.path.join(storage, name), storages.join(remote, name)).pull()
            summary = summarise_experiment(storage, name, remote)
            if summary.stages:
                summaries.append(summary)
        return summaries
    if not os.path.isdir(storage):
        raise VirFaceError(f"storage: {storage} does not exist (give the --storage the searches used)")
    summaries = []
    for name in sorted(os.listdir(storage)):
        if os.path.isdir(os.path.join(storage, name)):
            summary = summarise_experiment(storage, name)
            if summary.stages:
                summaries.append(summary)
    return summaries


def format_experiments(storage: str, summaries: list[ExperimentSummary]) -> str:
    if not summaries:
        return f"no experiments under {storage}"
    lines = [f"experiments under {storage}:"]
    for s in summaries:
        lines.append("")
        lines.append(s.name + (f"  (running: driver {s.driver})" if s.driver else ""))
        for st in s.stages:
            text = f"  {st.stage:<10} {st.status:<11}"
            m = st.manifest
            if m is not None:
                text += (f" {st.trials} trial(s)  best {m.metric_name}={m.metric_value:.4f} "
                         f"(trial {m.trial_id})")
                accuracies = {k: v for k, v in m.test_metrics.items() if k.endswith("_acc")}
                if accuracies:
                    text += "  test: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(accuracies.items()))
                if m.overrides:
                    text += "  (" + ", ".join(f"{k}={v}" for k, v in m.overrides.items()) + ")"
            if st.note:
                text += f" {st.note}"
            lines.append(text.rstrip())
        if os.path.exists(os.path.join(s.folder, "comparison", "comparison.json")):
            lines.append(f"  comparison  {os.path.join(s.folder, 'comparison')}")
    return "\n".join(lines)
