"""Does unlabeled shallow data help? ArcFace vs VirClass vs VirFace on the built-in synthetic faces,
chosen on validation pairs and reported on test pairs.

Data (generated once from a fixed data seed, renderer v4): a deep labeled split (50 identities x 40
images), a shallow split (2,000 identities x 1-3 images, labels hidden from the methods), and
three disjoint identity ranges: training, VALIDATION pairs (synth_*) and TEST pairs (test_synth_*).

Protocol, per training seed:
  1. ``pretrain``: ArcFace on the deep split from scratch.
  2. ``generator``: the feature VAE on that checkpoint (a second, residual one for that variant).
  3. Continuations from the same weights, same steps, same lr schedule, same labeled batches (the
     batch order depends only on the seed) and the same labeled-feature dropout (``Plan.dropout``,
     not tuned, the same value for every arm):
       baseline    ``baseline``: the pretrained model continued on the deep faces alone
       virclass    the shallow faces as virtual classes
       virface:*   VirFace variants (``VIRFACE_VARIANTS``), shallow faces as virtual classes plus
                   generated virtual instances
       oracle      the shallow faces WITH their true identities as 2,000 more classes, batched
                   like VirFace (deep + shallow halves per step, ``StageData.labeled_split``); their
                   head rows start at their mean feature (how virtual classes start), so the
                   oracle is the ceiling of what the shallow faces could add.
  Every epoch is scored on the validation pairs (10-fold accuracy). Per run, the epoch with the
  best validation accuracy on the hardest pair set (synth_cfp_fp) is chosen (best.pt), and only
  that checkpoint is then scored on the test pairs; the best VirFace variant is the one with the
  best mean validation accuracy over seeds. No test figure exists while anything is chosen. Gains are paired
  differences to the baseline of the same seed, in points, on the hardest test pair set.

    python benchmarks/shallow_data.py              # full: 5 seeds, 2 processes, <= 45 min on 2 cores
    python benchmarks/shallow_data.py --gpu        # larger data on CUDA, plain torch (no Ray)
    python benchmarks/shallow_data.py --smoke      # tiny data, 1-step epochs; what the test runs
    python benchmarks/shallow_data.py --from-json docs/shallow_data/results.json   # tables again

Writes ``results.json`` (plan, every run's per-epoch validation metrics and losses, its test metrics, wall
times, machine), ``summary.json`` (the schema of docs/RESULTS.md), ``table.md``, ``gains.png`` and
``curves.png`` (validation accuracy and L_vi per epoch) into ``--out`` (default
docs/shallow_data) and prints the tables. Nothing here imports Ray or Optuna.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from virface.config import TEST_PREFIX, TrainConfig  # noqa: E402
from virface.data.loading import StageData  # noqa: E402
from virface.data.sources import ArraySource  # noqa: E402
from virface.data.synthetic import PAIR_SET_NAMES as PAIR_SETS  # noqa: E402
from virface.fileio import write_text_atomic  # noqa: E402
from virface.metrics import paired_differences  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARDEST = "synth_cfp_fp"
SELECT_ON = f"{HARDEST}_acc"                      # validation metric every choice reads
REPORT_ON = f"{TEST_PREFIX}{HARDEST}_acc"         # the test metric the gains are about

# VirFace variants: (overrides of the continuation, generator kind it starts from, label).
VIRFACE_VARIANTS: dict[str, tuple[dict[str, Any], str, str]] = {
    "alternate": ({"optim_mode": "alternate"}, "plain", "reference path: G step, then backbone/W step"),
    "joint": ({"optim_mode": "joint", "gen_target_grad": True}, "plain",
              "reference joint mode exactly: one optimiser, the MSE also pulls W"),
    "warmup": ({"optim_mode": "alternate", "vi_weight": 0.5, "vi_warmup_epochs": 3.0}, "plain",
               "L_vi x 0.5, ramped up over 3 epochs"),
    "to_backbone": ({"optim_mode": "alternate", "vi_to_backbone": True}, "plain",
                    "not the reference's: L_vi reaches the backbone through the frozen G"),
    "residual": ({"optim_mode": "alternate"}, "residual", "not the reference's: residual G (u -> u + delta)"),
}


@dataclass
class Plan:
    """One benchmark size. Every setting is the same for every arm; see the module doc."""

    name: str
    synthetic: dict[str, Any]
    seeds: tuple[int, ...]
    pretrain_epochs: int
    pretrain_decay_epochs: tuple[int, ...]
    generator_epochs: int
    continue_epochs: int
    continue_decay_epochs: tuple[int, ...]     # lr x gamma after these continuation epochs
    variants: tuple[str, ...] = ("alternate", "joint", "to_backbone", "residual")
    # Validation pair sets scored every epoch. Only the hardest is ever selected on, so the others
    # are left out by default: scoring them would double each epoch's evaluation time.
    select_sets: tuple[str, ...] = (HARDEST,)
    processes: int = 2                         # runs at once (each with its own torch threads)
    steps_per_epoch: int | None = None         # None: one pass over the deep split per epoch
    label_batch_size: int = 64
    unlabel_batch_size: int = 64
    pretrain_lr: float = 0.1
    generator_lr: float = 0.1
    continue_lr: float = 0.05
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    s: float = 32.0
    m: float = 0.4
    dropout: float = 0.0          # labeled-feature dropout of EVERY arm (baseline and oracle too)
    gen_num: int = 5
    KL: float = 2.0
    L2: float = 5e3
    arch: str = "mobilefacenet_s"
    feat_len: int = 256
    device: str = "cpu"
    arms: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        self.arms = ("baseline", "virclass", *(f"virface:{v}" for v in self.variants), "oracle")


PLANS = {
    "full": Plan(
        name="full",
        synthetic=dict(image_size=32, seed=0, n_labeled_ids=50, images_per_labeled_id=40,
                       n_unlabeled_ids=2000, unlabeled_images_per_id=(1, 3), n_val_ids=400,
                       val_pairs=3000, n_test_ids=400, test_pairs=2000),
        seeds=(0, 1, 2, 3, 4), pretrain_epochs=20, pretrain_decay_epochs=(12, 17), generator_epochs=10,
        continue_epochs=10, continue_decay_epochs=(6, 8)),
    "gpu": Plan(
        name="gpu",
        synthetic=dict(image_size=32, seed=0, n_labeled_ids=200, images_per_labeled_id=40,
                       n_unlabeled_ids=10000, unlabeled_images_per_id=(1, 3), n_val_ids=1000,
                       val_pairs=6000, n_test_ids=1000, test_pairs=6000),
        select_sets=PAIR_SETS,
        seeds=(0, 1, 2, 3, 4), pretrain_epochs=20, pretrain_decay_epochs=(12, 17), generator_epochs=10,
        continue_epochs=12, continue_decay_epochs=(7, 10), processes=1, label_batch_size=128,
        unlabel_batch_size=128, arch="mobilefacenet", feat_len=512, device="cuda"),
    "smoke": Plan(
        name="smoke",
        synthetic=dict(image_size=16, seed=0, n_labeled_ids=6, images_per_labeled_id=4,
                       n_unlabeled_ids=12, unlabeled_images_per_id=(1, 2), n_val_ids=20,
                       val_pairs=40, n_test_ids=20, test_pairs=40),
        seeds=(0, 1), pretrain_epochs=1, pretrain_decay_epochs=(), generator_epochs=1,
        continue_epochs=2, continue_decay_epochs=(), variants=("alternate", "residual"), select_sets=PAIR_SETS,
        label_batch_size=8, unlabel_batch_size=8, feat_len=64, steps_per_epoch=1),
}


# ---------------------------------------------------------------------------------------- data

def load_faces(plan: Plan, cache_dir: str):
    from virface.data.synthetic import SyntheticSpec, load_synthetic

    return load_synthetic(SyntheticSpec.from_dict(plan.synthetic), cache_dir=cache_dir)


def stage_data(plan: Plan, faces) -> StageData:
    """Training data with the validation pair sets only: test pairs are scored once, on best.pt."""
    return StageData(faces.labeled, faces.unlabeled, val_sets(plan, faces), faces.spec.image_size)


def val_sets(plan: Plan, faces) -> dict[str, Any]:
    return {name: faces.pair_sets[name] for name in plan.select_sets}


def oracle_data(plan: Plan, faces) -> StageData:
    """Deep then shallow images, all with their true identities, batched like VirFace's."""
    deep, shallow = faces.labeled, faces.unlabeled
    union = ArraySource(np.concatenate([deep.images, shallow.images]),
                        np.concatenate([deep.classes[deep.labels], shallow.classes[shallow.labels]]),
                        "synthetic:deep+shallow(true ids)")
    return StageData(union, None, val_sets(plan, faces), faces.spec.image_size, labeled_split=len(deep))


def check_roles_apart(faces) -> dict[str, int]:
    """No identity serves two roles: training, validation pairs and test pairs are disjoint."""
    train = set(faces.labeled.classes.tolist()) | set(faces.unlabeled.classes.tolist())
    val = {int(i) for ids in faces.val_identities.values() for i in ids}
    test = {int(i) for ids in faces.test_identities.values() for i in ids}
    if train & val or train & test or val & test:
        raise RuntimeError("synthetic faces: an identity serves two roles (training/val/test)")
    return {"train_ids": len(train), "val_ids": len(val), "test_ids": len(test)}


# ------------------------------------------------------------------------------------ training

def base_config(plan: Plan, seed: int, steps_per_epoch: int) -> TrainConfig:
    return TrainConfig(
        arch=plan.arch, feat_len=plan.feat_len, s=plan.s, m=plan.m, dropout=plan.dropout,
        gen_num=plan.gen_num, KL=plan.KL, L2=plan.L2, label_batch_size=plan.label_batch_size,
        unlabel_batch_size=plan.unlabel_batch_size, steps_per_epoch=steps_per_epoch,
        momentum=plan.momentum, weight_decay=plan.weight_decay, gamma=plan.gamma,
        synthetic=plan.synthetic, eval=False, tensorboard=False, device=plan.device, seed=seed,
        loader_workers=0, log_every=0)


def steps_per_epoch(plan: Plan) -> int:
    s = plan.synthetic
    return plan.steps_per_epoch or math.ceil(s["n_labeled_ids"] * s["images_per_labeled_id"]
                                             / plan.label_batch_size)


def epoch_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch figures of a run (losses, lr, validation and test metrics), rounded."""
    keep = ("epoch", "loss", "loss_arcface", "loss_vc", "loss_vi", "gen_mse", "gen_kl", "lr", "steps",
            "epoch_time_s")
    rows = []
    for h in history:
        row = {k: h[k] for k in keep if k in h}
        row.update({k: v for k, v in h.items() if k.endswith("_acc") or k.endswith("_tar_far1e-3")})
        rows.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return rows


def chosen_epoch(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch with the best validation accuracy on the hardest pair set (the earliest on a tie):
    what best.pt holds. No test pair has been scored yet."""
    return max(epochs, key=lambda e: (e[SELECT_ON], -e["epoch"]))


def test_metrics(path: str, faces, device: str) -> dict[str, float]:
    """The test pair sets scored once, on the chosen epoch's checkpoint."""
    from virface.checkpoint import load_backbone
    from virface.evaluation.verification import evaluate_pair_sets

    backbone, _ = load_backbone(path, device=device)
    return {k: round(v, 6) for k, v in evaluate_pair_sets(backbone, faces.test_pair_sets, device,
                                                          prefix=TEST_PREFIX).items()}


class Worker:
    """Runs one job of the plan in a process of the pool: data from the cache, one torch thread."""

    def __init__(self, plan: Plan, cache: str, work: str, threads: int):
        self.plan, self.cache, self.work, self.threads = plan, cache, work, threads

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        torch.set_num_threads(self.threads)
        faces = load_faces(self.plan, self.cache)
        start = time.perf_counter()
        if job["kind"] == "starts":
            record = run_starts(self.plan, faces, job["seed"], self.work, job["generators"])
        else:
            record = run_arm(self.plan, faces, job["arm"], job["seed"], job["starts"], self.work)
        record["wall_s"] = round(time.perf_counter() - start, 1)
        return record


def _stage(config: TrainConfig, run_dir: str, data: StageData):
    from virface.stages import run_stage

    return run_stage(config, run_dir, data=data, keep_epoch_checkpoints=False)  # best.pt is kept


def run_starts(plan: Plan, faces, seed: int, work: str, generators: list[str]) -> dict[str, Any]:
    """Pretrain, then each generator kind needed, for one seed; the checkpoints the arms start from."""
    data = stage_data(plan, faces)
    cfg = base_config(plan, seed, steps_per_epoch(plan))
    pre_cfg = cfg.replace(method="pretrain", lr=plan.pretrain_lr, max_epoch=plan.pretrain_epochs,
                          decay_steps=plan.pretrain_decay_epochs or (plan.pretrain_epochs + 1,))
    pre = _stage(pre_cfg, os.path.join(work, f"seed{seed}", "pretrain"), data)
    starts = {"pretrain": pre.last_checkpoint}
    losses = {"pretrain_loss": round(pre.history[-1]["loss"], 4)}
    for kind in generators:
        gen_cfg = cfg.replace(method="generator", lr=plan.generator_lr, max_epoch=plan.generator_epochs,
                              decay_steps=(plan.generator_epochs + 1,), pretrained_file=pre.last_checkpoint,
                              gen_residual=kind == "residual")
        gen = _stage(gen_cfg, os.path.join(work, f"seed{seed}", f"generator-{kind}"), data)
        starts[f"generator:{kind}"] = gen.last_checkpoint
        losses[f"generator_{kind}_mse"] = round(gen.history[-1]["gen_mse"], 6)
    starts["oracle"] = write_oracle_start(pre.last_checkpoint, faces, os.path.join(work, f"seed{seed}"),
                                          plan.device)
    return {"kind": "starts", "seed": seed, "starts": starts, **losses}


@torch.no_grad()
def write_oracle_start(pretrain_path: str, faces, folder: str, device: str) -> str:
    """The pretrain checkpoint with one more head row per shallow identity, at that identity's
    L2-normalised mean feature (virtual classes start at their features the same way)."""
    from virface.checkpoint import load_backbone, load_checkpoint, save_checkpoint
    from virface.data.images import normalize_pixels

    backbone, _ = load_backbone(pretrain_path, device=device)
    state = load_checkpoint(pretrain_path)
    shallow = faces.unlabeled
    feats = []
    for i in range(0, len(shallow), 256):
        x = torch.from_numpy(shallow.images[i:i + 256]).permute(0, 3, 1, 2).to(device)
        feats.append(torch.nn.functional.normalize(backbone(normalize_pixels(x)), dim=1).cpu())
    feats = torch.cat(feats)
    labels = torch.from_numpy(shallow.labels.astype(np.int64))
    n_new = int(shallow.num_classes)
    means = torch.zeros(n_new, feats.shape[1]).index_add_(0, labels, feats)
    weight = state["head"]["weight"]
    rows = torch.nn.functional.normalize(means, dim=1) * weight.norm(dim=1).mean()
    state["head"]["weight"] = torch.cat([weight, rows.to(weight.dtype)])
    n_ids = int(weight.shape[0]) + n_new
    state["model"]["num_ids"] = n_ids
    state["config"] = {**state.get("config", {}), "num_ids": n_ids}
    for key in ("optimizers", "schedulers"):
        state.pop(key, None)
    path = os.path.join(folder, "oracle_start.pt")
    save_checkpoint(state, path)
    return path


def arm_config(plan: Plan, arm: str, seed: int, starts: dict[str, str]) -> tuple[TrainConfig, str]:
    cfg = base_config(plan, seed, steps_per_epoch(plan)).replace(
        lr=plan.continue_lr, max_epoch=plan.continue_epochs, eval=True,
        decay_steps=plan.continue_decay_epochs or (plan.continue_epochs + 1,))
    if arm == "baseline":
        return cfg.replace(method="baseline", pretrained_file=starts["pretrain"]), "pretrain"
    if arm == "oracle":
        return cfg.replace(method="baseline", pretrained_file=starts["oracle"]), "oracle"
    if arm == "virclass":
        return cfg.replace(method="virclass", pretrained_file=starts["pretrain"]), "pretrain"
    overrides, generator, _ = VIRFACE_VARIANTS[arm.split(":", 1)[1]]
    start = f"generator:{generator}"
    return cfg.replace(method="virface", pretrained_file=starts[start], **overrides), start


def run_arm(plan: Plan, faces, arm: str, seed: int, starts: dict[str, str], work: str) -> dict[str, Any]:
    cfg, start = arm_config(plan, arm, seed, starts)
    data = oracle_data(plan, faces) if arm == "oracle" else stage_data(plan, faces)
    result = _stage(cfg, os.path.join(work, f"seed{seed}", arm.replace(":", "-")), data)
    epochs = epoch_rows(result.history)
    chosen = chosen_epoch(epochs)
    if chosen["epoch"] != result.best.get("epoch"):
        raise RuntimeError(f"{arm} seed {seed}: best.pt holds epoch {result.best.get('epoch')}, "
                           f"the validation pairs chose {chosen['epoch']}")
    chosen = {**chosen, **test_metrics(result.best_checkpoint, faces, plan.device)}
    return {"kind": "arm", "arm": arm, "seed": seed, "start": start, "epochs": epochs, "chosen": chosen,
            "config": {k: v for k, v in cfg.to_dict().items()
                       if k in ("method", "optim_mode", "lr", "decay_steps", "max_epoch", "gen_num",
                                "dropout", "s", "m", "KL", "L2", "vi_weight", "vi_warmup_epochs",
                                "vi_to_backbone", "gen_target_grad", "label_batch_size",
                                "unlabel_batch_size", "steps_per_epoch", "seed")}}


def run_plan(plan: Plan, cache: str, work: str, threads: int, log=print) -> list[dict[str, Any]]:
    """Every seed's starts, then every arm of every seed, ``plan.processes`` jobs at a time (in
    this process when 1)."""
    generators = sorted({VIRFACE_VARIANTS[v][1] for v in plan.variants})
    worker = Worker(plan, cache, work, threads)
    records: list[dict[str, Any]] = []
    with job_pool(plan.processes) as pool:
        start_jobs = [{"kind": "starts", "seed": s, "generators": generators} for s in plan.seeds]
        starts = {}
        for rec in pool.map(worker, start_jobs):
            records.append(rec)
            starts[rec["seed"]] = rec["starts"]
            log(f"  seed {rec['seed']} pretrain + generator(s) {', '.join(generators)} "
                f"({rec['wall_s']:.0f} s)")
        jobs = [{"kind": "arm", "arm": arm, "seed": s, "starts": starts[s]}
                for s in plan.seeds for arm in plan.arms]
        futures = [pool.submit(worker, job) for job in jobs]
        for fut in concurrent.futures.as_completed(futures):
            rec = fut.result()
            records.append(rec)
            c = rec["chosen"]
            log(f"  seed {rec['seed']} {rec['arm']:<22} epoch {c['epoch']:>2} chosen on val: "
                f"val {HARDEST} {100 * c[SELECT_ON]:.2f}  test {100 * c[REPORT_ON]:.2f} "
                f"({rec['wall_s']:.0f} s)")
    return records


def job_pool(processes: int) -> concurrent.futures.Executor:
    """Spawned processes (a fresh torch each, one thread each); one process: this one."""
    if processes > 1:
        return concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    return concurrent.futures.ThreadPoolExecutor(1)


# ------------------------------------------------------------------------------------- summary

def _mean_std(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "values": [float(v) for v in arr]}


def summarise(records: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Per arm: validation and test figures at the chosen epochs, over seeds; the VirFace variant
    chosen on validation; paired test gains to the baseline, in points."""
    arms = {r["arm"]: {} for r in records if r["kind"] == "arm"}
    by = {(r["arm"], r["seed"]): r["chosen"] for r in records if r["kind"] == "arm"}
    seeds = list(plan.seeds)
    val_metrics = [f"{p}_acc" for p in plan.select_sets]
    test_metrics = [f"{TEST_PREFIX}{p}_acc" for p in PAIR_SETS]
    for arm in arms:
        arms[arm] = {m: _mean_std([by[arm, s][m] for s in seeds]) for m in val_metrics + test_metrics}
        arms[arm]["epoch"] = [by[arm, s]["epoch"] for s in seeds]
    variants = [a for a in arms if a.startswith("virface:")]
    best_variant = max(variants, key=lambda a: arms[a][SELECT_ON]["mean"])   # validation only

    def gain(arm: str, metric: str, reference: str = "baseline") -> dict[str, Any]:
        d = paired_differences([by[arm, s][metric] for s in seeds], [by[reference, s][metric] for s in seeds])
        return {**d, "std": d["std"] or 0.0}        # one seed: no spread, as _mean_std

    gains = {arm: {"test": gain(arm, REPORT_ON), "val": gain(arm, SELECT_ON)}
             for arm in arms if arm != "baseline"}
    vc_vs = gain(best_variant, REPORT_ON, reference="virclass")
    oracle = gains["oracle"]["test"]["mean"]
    return {"arms": arms, "best_variant": best_variant, "gains": gains,
            "virface_minus_virclass": vc_vs,
            "oracle_share": (gains[best_variant]["test"]["mean"] / oracle) if oracle > 0 else None}


def summary_json(summary: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """docs/shallow_data/summary.json, the schema docs/RESULTS.md describes."""
    g = summary["gains"]
    best = summary["best_variant"]
    return {"seeds": len(plan.seeds), "select_on": list(plan.select_sets),
            "report_on": [f"{TEST_PREFIX}{p}" for p in PAIR_SETS], "hardest": HARDEST,
            "oracle_gain": {"mean": g["oracle"]["test"]["mean"], "std": g["oracle"]["test"]["std"]},
            "methods": {"virclass": {"gain_mean": g["virclass"]["test"]["mean"],
                                     "gain_std": g["virclass"]["test"]["std"]},
                        "virface": {"gain_mean": g[best]["test"]["mean"], "gain_std": g[best]["test"]["std"],
                                    "variant": best.split(":", 1)[1]}},
            "virface_minus_virclass": {"mean": summary["virface_minus_virclass"]["mean"],
                                       "std": summary["virface_minus_virclass"]["std"]},
            "oracle_share": summary["oracle_share"]}


def _fmt(st: dict[str, Any], scale: float = 100.0) -> str:
    return f"{st['mean'] * scale:.2f} ± {st['std'] * scale:.2f}"


def arm_label(arm: str) -> str:
    if arm.startswith("virface:"):
        name = arm.split(":", 1)[1]
        return f"VirFace {name} ({VIRFACE_VARIANTS[name][2]})"
    return {"baseline": "ArcFace baseline (deep faces only)", "virclass": "VirClass",
            "oracle": "oracle (shallow faces with true labels)"}[arm]


def markdown_tables(summary: dict[str, Any], plan: Plan) -> str:
    n = len(plan.seeds)
    best = summary["best_variant"]
    val = plan.select_sets
    head = ("| arm | " + " | ".join(f"val {p}" for p in val) + " | "
            + " | ".join(f"test {p}" for p in PAIR_SETS) + " | chosen epochs |\n|---|"
            + "---:|" * (len(val) + len(PAIR_SETS)) + "---|")
    out = [f"Accuracy %, at each run's epoch chosen on validation {HARDEST} (mean ± std over {n} seeds)",
           "", head]
    for arm, st in summary["arms"].items():
        mark = " **(chosen on val)**" if arm == best else ""
        cells = [_fmt(st[f"{p}_acc"]) for p in val] + [_fmt(st[f"{TEST_PREFIX}{p}_acc"]) for p in PAIR_SETS]
        out.append(f"| {arm_label(arm)}{mark} | " + " | ".join(cells) + f" | {st['epoch']} |")
    out += ["", f"Paired difference to the baseline of the same seed, points, on {HARDEST} "
                f"(mean ± std over {n} seeds; per-seed signs)", "",
            "| arm | validation | test | test signs | test gain / paired std |", "|---|---:|---:|---|---:|"]
    for arm, g in summary["gains"].items():
        t, v = g["test"], g["val"]
        ratio = f"{t['mean'] / t['std']:.1f}" if t["std"] > 0 else "-"
        out.append(f"| {arm_label(arm)} | {v['mean']:+.2f} ± {v['std']:.2f} | {t['mean']:+.2f} ± "
                   f"{t['std']:.2f} | {t['signs']} | {ratio} |")
    d = summary["virface_minus_virclass"]
    share = summary["oracle_share"]
    out += ["", f"VirFace ({best.split(':', 1)[1]}, chosen on validation) - VirClass on test {HARDEST}: "
                f"{d['mean']:+.2f} ± {d['std']:.2f} points; share of the oracle's gain: "
                + (f"{100 * share:.0f} %" if share is not None else "- (no oracle gain)")]
    return "\n".join(out) + "\n"


def verdict(summary: dict[str, Any]) -> list[str]:
    """The issue's goals, each checked against the numbers (printed, and stored in results.json)."""
    g = summary["gains"]
    best = summary["best_variant"]

    def above(st):
        return st["mean"] > 2 * st["std"]

    d = summary["virface_minus_virclass"]
    share = summary["oracle_share"]
    return [f"VirClass > baseline by > 2 paired stds: {above(g['virclass']['test'])}",
            f"VirFace ({best}) > VirClass by > 2 paired stds: {above(d)}",
            f"VirFace captures >= 1/3 of the oracle gain: {share is not None and share >= 1 / 3}"]


# --------------------------------------------------------------------------------------- plots

def plot_gains(summary: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["gains"])
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(arms) + 1.6))
    for i, arm in enumerate(arms):
        t = summary["gains"][arm]["test"]
        ax.scatter(t["values"], [i] * len(t["values"]), s=18, color="0.55", zorder=2)
        ax.errorbar(t["mean"], i, xerr=t["std"], fmt="o", color="C3" if arm == "oracle" else "C0",
                    capsize=4, zorder=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(arms)), [a.replace("virface:", "VirFace ") for a in arms])
    ax.invert_yaxis()
    ax.set_xlabel(f"test {HARDEST} accuracy minus the baseline's, points (dots: seeds; bar: mean ± std)")
    ax.set_title("Gain over ArcFace on deep faces only, at epochs chosen on validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(records: list[dict[str, Any]], path: str) -> str:
    """Validation accuracy on the hardest pair set per continuation epoch, mean over seeds, and
    each arm's training loss: where an arm gains or loses ground, and whether its loss explains it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["kind"] == "arm"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    fig, (ax_acc, ax_vi) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, arm in enumerate(arms):
        mine = [r for r in runs if r["arm"] == arm]
        acc = np.mean([[100 * e[SELECT_ON] for e in r["epochs"]] for r in mine], axis=0)
        epochs = range(1, len(acc) + 1)
        style = {"color": f"C{i}", "lw": 2.2 if arm in ("baseline", "oracle") else 1.4}
        ax_acc.plot(epochs, acc, label=arm.replace("virface:", "VirFace "), **style)
        vi = [[e.get("loss_vi") for e in r["epochs"]] for r in mine]
        if all(v is not None for row in vi for v in row):
            ax_vi.plot(epochs, np.mean(vi, axis=0), label=arm.replace("virface:", "VirFace "), **style)
    ax_acc.set_xlabel("continuation epoch")
    ax_acc.set_ylabel(f"validation {HARDEST} accuracy %, mean over seeds")
    ax_acc.legend(fontsize=8)
    ax_vi.set_xlabel("continuation epoch")
    ax_vi.set_ylabel("L_vi (VirInstance CE), epoch mean, mean over seeds")
    if ax_vi.lines:
        ax_vi.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny data, 1-step epochs (the test)")
    mode.add_argument("--gpu", action="store_true", help="larger data and backbone on CUDA")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "shallow_data"),
                   help="folder for results.json, summary.json, table.md and gains.png")
    p.add_argument("--work", default=None,
                   help="folder for the run folders (checkpoints); default: a temporary folder, deleted")
    p.add_argument("--cache-dir", default=None,
                   help="synthetic data cache; default $VIRFACE_CACHE_DIR, else inside the work folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (default 1: two 1-thread processes on 2 cores)")
    p.add_argument("--processes", type=int, default=None, help="runs at once (default: the plan's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the plan's seeds")
    p.add_argument("--variants", nargs="+", choices=list(VIRFACE_VARIANTS), default=None,
                   help="VirFace variants to run (default: the plan's)")
    p.add_argument("--from-json", default=None, metavar="RESULTS_JSON",
                   help="train nothing: tables, summary.json and the plot again from a results.json")
    return p.parse_args(argv)


def plan_of(args) -> Plan:
    plan = PLANS["smoke" if args.smoke else "gpu" if args.gpu else "full"]
    changes = {}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.variants:
        changes["variants"] = tuple(args.variants)
    if args.processes:
        changes["processes"] = args.processes
    return dataclasses.replace(plan, **changes)


def plan_from_dict(values: dict[str, Any]) -> Plan:
    names = {f.name for f in dataclasses.fields(Plan) if f.init}
    return Plan(**{k: (tuple(v) if isinstance(v, list) and k != "synthetic" else v)
                   for k, v in values.items() if k in names})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            results = json.load(f)
        plan = plan_from_dict(results["plan"])
        return write_outputs(results, summarise(results["records"], plan), plan, args.out)
    plan = plan_of(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="shallow-data-") as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        cache = args.cache_dir or os.environ.get("VIRFACE_CACHE_DIR") or os.path.join(work, "cache")
        return _run(plan, args, work, cache)


def _run(plan: Plan, args, work: str, cache: str) -> dict[str, Any]:
    from virface.data.synthetic import RENDERER_VERSION

    start = time.perf_counter()
    load_start = os.getloadavg()
    faces = load_faces(plan, cache)          # built once here; the workers read the cache
    roles = check_roles_apart(faces)
    print(f"[{plan.name}] deep {len(faces.labeled)} images / {faces.labeled.num_classes} ids, shallow "
          f"{len(faces.unlabeled)} images / {faces.unlabeled.num_classes} ids; identities apart: {roles}; "
          f"{steps_per_epoch(plan)} steps per epoch; arms {', '.join(plan.arms)}; {len(plan.seeds)} seeds, "
          f"{plan.processes} at once (data {time.perf_counter() - start:.0f} s)", flush=True)
    records = run_plan(plan, cache, work, args.threads, log=lambda text: print(text, flush=True))
    summary = summarise(records, plan)
    wall = time.perf_counter() - start
    command = "python benchmarks/shallow_data.py" + (f" --{plan.name}" if plan.name != "full" else "")
    results = {
        "plan": dataclasses.asdict(plan), "protocol": __doc__,
        "data": {"deep_images": len(faces.labeled), "deep_ids": int(faces.labeled.num_classes),
                 "shallow_images": len(faces.unlabeled), "shallow_ids": int(faces.unlabeled.num_classes),
                 **roles, "renderer_version": RENDERER_VERSION},
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "processes": plan.processes,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(),
                    "device": torch.cuda.get_device_name() if plan.device == "cuda" else "cpu",
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "wall_s": round(wall, 1), "command": command,
        "records": sorted(records, key=lambda r: (r["seed"], r["kind"], r.get("arm", ""))),
    }
    write_outputs(results, summary, plan, args.out)
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); outputs in {args.out}")
    return results


def write_outputs(results: dict[str, Any], summary: dict[str, Any], plan: Plan, out: str) -> dict[str, Any]:
    results["summary"] = summary
    results["verdict"] = verdict(summary)
    table = markdown_tables(summary, plan)
    write_text_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1) + "\n")
    write_text_atomic(os.path.join(out, "summary.json"), json.dumps(summary_json(summary, plan), indent=2) + "\n")
    write_text_atomic(os.path.join(out, "table.md"), table + "\n" + "\n".join(results["verdict"]) + "\n")
    plot_gains(summary, os.path.join(out, "gains.png"))
    plot_curves(results["records"], os.path.join(out, "curves.png"))
    print()
    print(table)
    print("\n".join(results["verdict"]))
    return results


if __name__ == "__main__":
    main()
