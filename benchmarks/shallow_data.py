"""Does unlabeled shallow data help? ArcFace vs VirClass vs VirFace on the built-in synthetic faces,
chosen on validation pairs and reported on test pairs.

Data (generated once from a fixed data seed, renderer v4): a deep labeled split (50 identities x 40
images), a shallow split (2,000 identities x 1-3 images, labels hidden from the methods), and
three disjoint identity ranges: training, VALIDATION pairs (synth_*) and TEST pairs (test_synth_*).

Protocol, per training seed:
  1. ``pretrain``: ArcFace on the deep split from scratch.
  2. ``generator``: the feature VAE on that checkpoint (a second, residual one for that variant),
     then the GATE: every VirFace variant's instances are measured on the validation pairs'
     same-identity images (draw spread, identity keep, ...: virface.instance_diagnostics) and a
     variant whose instances lose identity is named in the log and the results before it trains.
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
  Every epoch is scored on the validation pairs (10-fold accuracy). The selection rule is fixed
  before anything runs (``--rule``, default ``mean_last:3``, see virface.selection): a run's
  validation value is the mean of its last 3 epochs' accuracy on the hardest pair set
  (synth_cfp_fp) and best.pt is its last epoch; only that checkpoint is then scored on the test
  pairs (``report_sets``, 20,000 pairs each in the full plan: sized so that a 1-point difference
  is visible). The best VirFace variant is the one with the best mean validation value over
  seeds. No test figure exists while anything is chosen. Gains are paired differences to the
  baseline of the same seed, in points, on the hardest test pair set, with the statistics of
  virface.stats: a paired t-test over seeds (mean, SE, 95 % interval, p-value, signs) and a
  bootstrap over seeds and test pairs (every seed is scored on the same pairs), and the minimum
  detectable effect (two-sided 5 %, 80 % power) from the measured variances.

    python benchmarks/shallow_data.py              # full: 5 seeds, 2 processes, ~45 min on 2 idle cores
    python benchmarks/shallow_data.py --gpu        # larger data on CUDA, plain torch (no Ray)
    python benchmarks/shallow_data.py --smoke      # tiny data, 1-step epochs; what the test runs
    python benchmarks/shallow_data.py --from-json docs/shallow_data/results.json   # tables again

What the full run costs (printed at its start, measured there): training dominates (~5-10 s per
epoch per run on one core, 35 runs x 10 epochs, two at a time); each evaluation of the
20,000 test pairs takes ~15 s and runs once per run; validation (3,000 pairs, ~2 s) every epoch.

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
from virface.errors import VirFaceError  # noqa: E402
from virface.fileio import write_text_atomic  # noqa: E402
from virface.selection import parse_rule  # noqa: E402
from virface.stats import (bootstrap_seeds_and_pairs, describe, min_detectable_effect,  # noqa: E402
                           paired_over_pairs, paired_over_seeds)

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
    # Issue 18's variants (none the reference's).
    "covariance": ({"optim_mode": "alternate", "vi_generator": "covariance", "cov_scale": 1.0,
                    "cov_shrink": 0.5}, "plain",
                   "not the reference's: covariance transfer (pooled within-identity covariance of the "
                   "deep faces, sources shrunk half-way to their estimated centre), no trained G"),
    "centre_grad": ({"optim_mode": "alternate", "vi_centre_grad": True, "vi_weight": 0.5,
                     "vi_warmup_epochs": 3.0}, "plain",
                    "not the reference's: L_vi reaches the backbone through the virtual centres "
                    "(x 0.5, ramped over 3 epochs)"),
    "gen_grad": ({"optim_mode": "alternate", "vi_gen_grad": True}, "plain",
                 "not the reference's: the alternating G step also takes L_vi's gradient"),
}
# The settings that decide what draws a variant's instances: what the gate measures.
SAMPLER_KEYS = ("vi_generator", "cov_rank", "cov_scale", "cov_shrink", "variation_images")


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
    # Test pair sets scored on each run's best.pt and reported. The gains are about the hardest;
    # the full plan scores only it (20,000 pairs, ~15 s an evaluation on one core).
    report_sets: tuple[str, ...] = (HARDEST,)
    # How a run's value is taken from its epochs (virface.selection), fixed before anything runs.
    rule: str = "mean_last:3"
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
        self.rule = parse_rule(self.rule, "rule").text
        for name in (*self.select_sets, *self.report_sets):
            if name not in PAIR_SETS:
                raise ValueError(f"pair set {name!r}: not one of {list(PAIR_SETS)}")
        if HARDEST not in self.select_sets or HARDEST not in self.report_sets:
            raise ValueError(f"select_sets and report_sets must hold {HARDEST} (what the gains are about)")


PLANS = {
    "full": Plan(
        name="full",
        synthetic=dict(image_size=32, seed=0, n_labeled_ids=50, images_per_labeled_id=40,
                       n_unlabeled_ids=2000, unlabeled_images_per_id=(1, 3), n_val_ids=400,
                       val_pairs=3000, n_test_ids=2000, test_pairs=20000),
        seeds=(0, 1, 2, 3, 4), pretrain_epochs=20, pretrain_decay_epochs=(12, 17), generator_epochs=10,
        continue_epochs=10, continue_decay_epochs=(6, 8)),
    "gpu": Plan(
        name="gpu",
        synthetic=dict(image_size=32, seed=0, n_labeled_ids=200, images_per_labeled_id=40,
                       n_unlabeled_ids=10000, unlabeled_images_per_id=(1, 3), n_val_ids=1000,
                       val_pairs=6000, n_test_ids=2000, test_pairs=20000),
        select_sets=PAIR_SETS, report_sets=PAIR_SETS,
        seeds=(0, 1, 2, 3, 4), pretrain_epochs=20, pretrain_decay_epochs=(12, 17), generator_epochs=10,
        continue_epochs=12, continue_decay_epochs=(7, 10), processes=1, label_batch_size=128,
        unlabel_batch_size=128, arch="mobilefacenet", feat_len=512, device="cuda"),
    "smoke": Plan(
        name="smoke",
        synthetic=dict(image_size=16, seed=0, n_labeled_ids=6, images_per_labeled_id=4,
                       n_unlabeled_ids=12, unlabeled_images_per_id=(1, 2), n_val_ids=20,
                       val_pairs=40, n_test_ids=20, test_pairs=40),
        seeds=(0, 1), pretrain_epochs=1, pretrain_decay_epochs=(), generator_epochs=1,
        continue_epochs=2, continue_decay_epochs=(), variants=("alternate", "residual", "covariance"),
        select_sets=PAIR_SETS,
        report_sets=PAIR_SETS,
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
        loader_workers=0, log_every=0, selection=plan.rule)


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


def chosen_epoch(epochs: list[dict[str, Any]], rule: str, val_metrics: list[str]) -> dict[str, Any]:
    """A run's validation figures under the selection ``rule``: the epoch best.pt holds and, per
    validation metric, the rule's value (best epoch's, last epoch's, or the mean of the last K).
    The epoch is chosen on ``SELECT_ON``. No test pair has been scored yet."""
    parsed = parse_rule(rule, "rule")
    epoch = parsed.epoch([e[SELECT_ON] for e in epochs], "max")
    row = epochs[epoch - 1]
    if parsed.kind == "best":           # every figure from that one epoch
        return {"epoch": epoch, **{m: row[m] for m in val_metrics}}
    return {"epoch": epoch, **{m: round(parsed.value([e[m] for e in epochs], "max"), 6) for m in val_metrics}}


def pack_bools(values: np.ndarray) -> str:
    """(N,) bool -> hex string (8 pairs a byte): per-pair outcomes small enough for results.json."""
    return np.packbits(np.asarray(values, dtype=bool)).tobytes().hex()


def unpack_bools(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def score_test_sets(backbone, faces, names: tuple[str, ...], device: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The test pair sets ``names`` scored once: (metrics with seconds per set, per-pair
    correctness per set as :func:`pack_bools` strings)."""
    from virface.evaluation.verification import evaluate_pair_set

    metrics: dict[str, Any] = {}
    correct: dict[str, str] = {}
    for name in names:
        start = time.perf_counter()
        result = evaluate_pair_set(backbone, faces.test_pair_sets[name], device=device)
        metrics[f"{TEST_PREFIX}{name}_acc"] = round(float(result.acc), 6)
        metrics[f"{TEST_PREFIX}{name}_acc_std"] = round(float(result.acc_std), 6)
        metrics[f"{TEST_PREFIX}{name}_tar_far1e-3"] = round(float(result.tar_at_far), 6)
        metrics[f"{TEST_PREFIX}{name}_eval_s"] = round(time.perf_counter() - start, 2)
        correct[name] = pack_bools(result.correct)
    return metrics, correct


def test_metrics(path: str, faces, names: tuple[str, ...], device: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The test pair sets scored once, on the chosen epoch's checkpoint."""
    from virface.checkpoint import load_backbone

    backbone, _ = load_backbone(path, device=device)
    return score_test_sets(backbone, faces, names, device)


def measure_eval_cost(plan: Plan, faces) -> dict[str, float]:
    """Seconds one evaluation of each validation and test pair set takes here (a fresh backbone of
    the plan's architecture, this process's torch threads): what the run will pay per epoch
    (validation) and per run (test)."""
    from virface.backbones.registry import build_backbone
    from virface.evaluation.verification import evaluate_pair_set

    backbone = build_backbone(plan.arch, feat_len=plan.feat_len, input_size=faces.spec.image_size)
    backbone.to(plan.device).eval()
    cost = {}
    for prefix, names, sets in (("", plan.select_sets, faces.pair_sets),
                                (TEST_PREFIX, plan.report_sets, faces.test_pair_sets)):
        for name in names:
            start = time.perf_counter()
            evaluate_pair_set(backbone, sets[name], device=plan.device)
            cost[f"{prefix}{name}"] = round(time.perf_counter() - start, 2)
    return cost


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
    losses = {"pretrain_loss": round(pre.history[-1]["loss"], 4),
              "pretrain_epoch_s": round(float(np.mean([h["epoch_time_s"] for h in pre.history])), 2)}
    for kind in generators:
        gen_cfg = cfg.replace(method="generator", lr=plan.generator_lr, max_epoch=plan.generator_epochs,
                              decay_steps=(plan.generator_epochs + 1,), pretrained_file=pre.last_checkpoint,
                              gen_residual=kind == "residual")
        gen = _stage(gen_cfg, os.path.join(work, f"seed{seed}", f"generator-{kind}"), data)
        starts[f"generator:{kind}"] = gen.last_checkpoint
        losses[f"generator_{kind}_mse"] = round(gen.history[-1]["gen_mse"], 6)
    gates = instance_gates(plan, starts, data)
    starts["oracle"] = write_oracle_start(pre.last_checkpoint, faces, os.path.join(work, f"seed{seed}"),
                                          plan.device)
    return {"kind": "starts", "seed": seed, "starts": starts, "gates": gates, **losses}


def instance_gates(plan: Plan, starts: dict[str, str], data: StageData) -> dict[str, dict[str, float]]:
    """Issue 18's gate, before any VirFace arm trains: each variant's instances measured on the
    validation pairs' same-identity images (virface.instance_diagnostics), with the variant's own
    sampler (its generator checkpoint, or covariance transfer on that backbone). A variant whose
    instances lose identity (identity keep < 0) still runs, since measuring it is this benchmark's
    job, but the log, results.json and the summary say so."""
    from virface.instance_diagnostics import generator_gate

    gates = {}
    for variant in plan.variants:
        overrides, kind, _ = VIRFACE_VARIANTS[variant]
        sampler = {k: v for k, v in overrides.items() if k in SAMPLER_KEYS}
        gates[variant] = generator_gate(starts[f"generator:{kind}"], data, go_on=True, device=plan.device,
                                        unlabel_batch_size=plan.unlabel_batch_size, gen_num=plan.gen_num,
                                        **sampler)
    return gates


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


def gate_line(figures: dict[str, float]) -> str:
    from virface.metrics import format_instance_metrics

    keeps = figures["vi_identity_keep"] >= 0
    return (format_instance_metrics(figures) + ("" if keeps else
            " -- LOSES IDENTITY (keep < 0): its arm runs anyway and is measured, not trusted to help"))


def run_arm(plan: Plan, faces, arm: str, seed: int, starts: dict[str, str], work: str) -> dict[str, Any]:
    cfg, start = arm_config(plan, arm, seed, starts)
    data = oracle_data(plan, faces) if arm == "oracle" else stage_data(plan, faces)
    result = _stage(cfg, os.path.join(work, f"seed{seed}", arm.replace(":", "-")), data)
    epochs = epoch_rows(result.history)
    chosen = chosen_epoch(epochs, plan.rule, [f"{p}_acc" for p in plan.select_sets])
    if chosen["epoch"] != result.best.get("epoch") or not math.isclose(
            chosen[SELECT_ON], result.best.get("value", math.nan), abs_tol=2e-6):
        raise RuntimeError(f"{arm} seed {seed}: best.pt holds epoch {result.best.get('epoch')} "
                           f"(value {result.best.get('value')}), the rule {plan.rule} chose epoch "
                           f"{chosen['epoch']} (value {chosen[SELECT_ON]})")
    scores, correct = test_metrics(result.best_checkpoint, faces, plan.report_sets, plan.device)
    chosen = {**chosen, **scores}
    return {"kind": "arm", "arm": arm, "seed": seed, "start": start, "epochs": epochs, "chosen": chosen,
            "test_correct": correct,
            "config": {k: v for k, v in cfg.to_dict().items()
                       if k in ("method", "optim_mode", "lr", "decay_steps", "max_epoch", "gen_num",
                                "dropout", "s", "m", "KL", "L2", "vi_weight", "vi_warmup_epochs",
                                "vi_to_backbone", "gen_target_grad", "vi_centre_grad", "vi_gen_grad",
                                "vi_generator", "cov_scale", "cov_shrink", "label_batch_size",
                                "unlabel_batch_size", "steps_per_epoch", "seed")}}


def expected_minutes(plan: Plan, epoch_s: float, eval_cost: dict[str, float]) -> dict[str, float]:
    """Rough minutes the arms will take, two parts: training (``epoch_s`` per epoch, a deep-only
    pretrain epoch; the arms with shallow faces take about twice that) and evaluation (validation
    every epoch, test once per run, from ``eval_cost``), divided over the processes."""
    runs = len(plan.seeds) * len(plan.arms)
    shallow_runs = len(plan.seeds) * (len(plan.arms) - 1)          # every arm but the baseline
    train = (runs + shallow_runs) * plan.continue_epochs * epoch_s
    val = runs * plan.continue_epochs * sum(eval_cost[p] for p in plan.select_sets)
    test = runs * sum(eval_cost[f"{TEST_PREFIX}{p}"] for p in plan.report_sets)
    per = 60.0 * min(plan.processes, runs)
    return {"training": train / per, "validation": val / per, "test": test / per,
            "total": (train + val + test) / per}


def run_plan(plan: Plan, cache: str, work: str, threads: int, log=print,
             eval_cost: dict[str, float] | None = None) -> list[dict[str, Any]]:
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
            for variant, figures in rec["gates"].items():
                log(f"    gate {variant}: {gate_line(figures)}")
        if eval_cost:
            epoch_s = float(np.mean([r["pretrain_epoch_s"] for r in records]))
            eta = expected_minutes(plan, epoch_s, eval_cost)
            log(f"expected for the {len(plan.seeds) * len(plan.arms)} runs: ~{eta['total']:.0f} min "
                f"(training ~{eta['training']:.0f}, validation ~{eta['validation']:.0f}, test "
                f"~{eta['test']:.0f}; {max(eta, key=lambda k: eta[k] if k != 'total' else -1)} dominates; "
                f"pretrain epochs took {epoch_s:.1f} s)")
        jobs = [{"kind": "arm", "arm": arm, "seed": s, "starts": starts[s]}
                for s in plan.seeds for arm in plan.arms]
        futures = [pool.submit(worker, job) for job in jobs]
        for fut in concurrent.futures.as_completed(futures):
            rec = fut.result()
            records.append(rec)
            c = rec["chosen"]
            log(f"  seed {rec['seed']} {rec['arm']:<22} best.pt epoch {c['epoch']:>2}: "
                f"val {HARDEST} ({plan.rule}) {100 * c[SELECT_ON]:.2f}  test {100 * c[REPORT_ON]:.2f} "
                f"({rec['wall_s']:.0f} s, test scored in {c[f'{REPORT_ON[:-4]}_eval_s']:.0f} s)")
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


def n_pairs(plan: Plan) -> dict[str, int]:
    """Pairs per validation and test pair set of the plan's synthetic data."""
    from virface.data.synthetic import SyntheticSpec

    spec = SyntheticSpec.from_dict(plan.synthetic)
    return {"val": spec.val_pairs, "test": spec.test_pairs}


def compare(by: dict, correct: dict, seeds: list[int], arm: str, reference: str, metric: str,
            with_pairs: bool = True, n_boot: int = 2000) -> dict[str, Any]:
    """``arm`` against ``reference`` on ``metric``, same seeds: the paired t-test over seeds
    (virface.stats.paired_over_seeds, points) and, ``with_pairs`` and where both have per-pair
    outcomes on the hardest test set, the bootstrap over seeds and pairs (~5 s on 5 x 20,000
    pairs) and the pair-sampling SE per seed."""
    out = paired_over_seeds([by[arm, s][metric] for s in seeds], [by[reference, s][metric] for s in seeds])
    if with_pairs and metric == REPORT_ON and all((a, s) in correct for a in (arm, reference) for s in seeds):
        a = np.stack([correct[arm, s] for s in seeds])
        b = np.stack([correct[reference, s] for s in seeds])
        boot = bootstrap_seeds_and_pairs(a, b, n_boot=n_boot, seed=0)
        out["seeds_and_pairs"] = {k: boot[k] for k in ("mean", "se", "ci95", "p_value", "n_boot")}
        # Pair sampling alone, per seed (the same pairs every seed): its RMS over seeds.
        pair_se = [paired_over_pairs(a[i], b[i])["se"] for i in range(len(seeds))]
        out["pairs_se"] = float(np.sqrt(np.mean(np.square(pair_se))))
    return out


def summarise(records: list[dict[str, Any]], plan: Plan,
              eval_cost: dict[str, float] | None = None) -> dict[str, Any]:
    """Per arm: validation figures under the rule and test figures at best.pt, over seeds; the
    VirFace variant chosen on validation; paired test comparisons in points (virface.stats); the
    minimum detectable effect of VirClass - baseline from the measured variances."""
    arms = {r["arm"]: {} for r in records if r["kind"] == "arm"}
    by = {(r["arm"], r["seed"]): r["chosen"] for r in records if r["kind"] == "arm"}
    pairs = n_pairs(plan)
    correct = {(r["arm"], r["seed"]): unpack_bools(r["test_correct"][HARDEST], pairs["test"])
               for r in records if r["kind"] == "arm" and HARDEST in r.get("test_correct", {})}
    seeds = list(plan.seeds)
    val_metrics = [f"{p}_acc" for p in plan.select_sets]
    test_metrics = [f"{TEST_PREFIX}{p}_acc" for p in plan.report_sets]
    for arm in arms:
        arms[arm] = {m: _mean_std([by[arm, s][m] for s in seeds]) for m in val_metrics + test_metrics}
        arms[arm]["epoch"] = [by[arm, s]["epoch"] for s in seeds]
    variants = [a for a in arms if a.startswith("virface:")]
    best_variant = max(variants, key=lambda a: arms[a][SELECT_ON]["mean"])   # validation only

    # The bootstrap for the comparisons the verdicts are about; the other variants: over seeds.
    headline = ("virclass", "oracle", best_variant)
    gains = {arm: {"test": compare(by, correct, seeds, arm, "baseline", REPORT_ON, arm in headline),
                   "val": compare(by, correct, seeds, arm, "baseline", SELECT_ON)}
             for arm in arms if arm != "baseline"}
    vf_vs_vc = compare(by, correct, seeds, best_variant, "virclass", REPORT_ON)
    oracle = gains["oracle"]["test"]["mean"]
    return {"arms": arms, "best_variant": best_variant, "gains": gains, "gates": summarise_gates(records),
            "virface_minus_virclass": vf_vs_vc,
            "oracle_share": (gains[best_variant]["test"]["mean"] / oracle) if oracle > 0 else None,
            "rule": plan.rule, "n_pairs": pairs, "eval_cost_s": eval_cost,
            "min_detectable_effect": detectable(gains["virclass"]["test"], len(seeds))}


def summarise_gates(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: each instance figure's mean over seeds, and whether every seed kept identity
    (runs from before the gate existed have none)."""
    per_seed = [r["gates"] for r in records if r["kind"] == "starts" and r.get("gates")]
    out = {}
    for variant in dict.fromkeys(v for gates in per_seed for v in gates):
        rows = [gates[variant] for gates in per_seed if variant in gates]
        out[variant] = {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}
        out[variant]["kept_identity_every_seed"] = all(row["vi_identity_keep"] >= 0 for row in rows)
        out[variant]["seeds"] = len(rows)
    return out


def detectable(comparison: dict[str, Any], n_seeds: int) -> dict[str, Any]:
    """Minimum detectable effect (points; two-sided 5 %, 80 % power) of a comparison from its own
    measured variances: for the paired t-test over seeds (SE over seeds, n - 1 degrees of
    freedom), for pair sampling alone and for the seeds-and-pairs bootstrap; ``value`` is the
    largest of those available (a gain smaller than that is likely missed)."""
    out = {"paired_t_over_seeds": None, "pairs_only": None, "seeds_and_pairs": None}
    if comparison.get("se") is not None:
        out["paired_t_over_seeds"] = min_detectable_effect(comparison["se"], df=n_seeds - 1)
    if comparison.get("pairs_se") is not None:
        out["pairs_only"] = min_detectable_effect(comparison["pairs_se"])
    if "seeds_and_pairs" in comparison:
        out["seeds_and_pairs"] = min_detectable_effect(comparison["seeds_and_pairs"]["se"])
    known = [v for v in out.values() if v is not None]
    return {"value": max(known) if known else None, **out}


def _stats_fields(c: dict[str, Any]) -> dict[str, Any]:
    """A comparison in summary.json: today's mean/std plus SE, interval, p-value, signs and the
    seeds-and-pairs interval."""
    out = {"gain_se": c["se"], "ci95": c["ci95"], "p_value": c["p_value"], "t": c["t"], "signs": c["signs"]}
    if "seeds_and_pairs" in c:
        sp = c["seeds_and_pairs"]
        out.update(ci95_seeds_and_pairs=sp["ci95"], p_value_seeds_and_pairs=sp["p_value"],
                   se_seeds_and_pairs=sp["se"], se_pairs_only=c["pairs_se"])
    return out


def summary_json(summary: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """docs/shallow_data/summary.json, the schema docs/RESULTS.md describes."""
    g = summary["gains"]
    best = summary["best_variant"]
    vf = summary["virface_minus_virclass"]
    oracle, virclass, virface = g["oracle"]["test"], g["virclass"]["test"], g[best]["test"]
    mde = summary["min_detectable_effect"]
    return {"seeds": len(plan.seeds),
            "rule": parse_rule(plan.rule).describe(f"validation {SELECT_ON}"), "rule_setting": plan.rule,
            "select_on": list(plan.select_sets),
            "report_on": [f"{TEST_PREFIX}{p}" for p in plan.report_sets], "hardest": HARDEST,
            "n_val_pairs": {p: summary["n_pairs"]["val"] for p in plan.select_sets},
            "n_test_pairs": {f"{TEST_PREFIX}{p}": summary["n_pairs"]["test"] for p in plan.report_sets},
            "oracle_gain": {"mean": oracle["mean"], "std": oracle["std"], **_stats_fields(oracle)},
            "methods": {"virclass": {"gain_mean": virclass["mean"], "gain_std": virclass["std"],
                                     **_stats_fields(virclass)},
                        "virface": {"gain_mean": virface["mean"], "gain_std": virface["std"],
                                    **_stats_fields(virface), "variant": best.split(":", 1)[1]}},
            "virface_minus_virclass": {"mean": vf["mean"], "std": vf["std"], **_stats_fields(vf)},
            "oracle_share": summary["oracle_share"],
            "instance_gate": summary.get("gates", {}),
            "min_detectable_effect": mde["value"],
            "min_detectable_effect_detail": {**mde, "of": "VirClass - baseline, test " + HARDEST,
                                             "alpha": 0.05, "power": 0.8, "unit": "points"},
            "eval_cost_s": summary["eval_cost_s"]}


def _fmt(st: dict[str, Any], scale: float = 100.0) -> str:
    return f"{st['mean'] * scale:.2f} ± {st['std'] * scale:.2f}"


def _interval(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _p(p) -> str:
    return "-" if p is None else f"{p:.3g}"


def arm_label(arm: str) -> str:
    if arm.startswith("virface:"):
        name = arm.split(":", 1)[1]
        return f"VirFace {name} ({VIRFACE_VARIANTS[name][2]})"
    return {"baseline": "ArcFace baseline (deep faces only)", "virclass": "VirClass",
            "oracle": "oracle (shallow faces with true labels)"}[arm]


def markdown_tables(summary: dict[str, Any], plan: Plan) -> str:
    n = len(plan.seeds)
    best = summary["best_variant"]
    val, rep = plan.select_sets, plan.report_sets
    pairs = summary["n_pairs"]
    head = ("| arm | " + " | ".join(f"val {p}" for p in val) + " | "
            + " | ".join(f"test {p}" for p in rep) + " | best.pt epochs |\n|---|"
            + "---:|" * (len(val) + len(rep)) + "---|")
    out = [f"Accuracy %, mean ± std over {n} seeds. Validation: {parse_rule(plan.rule).describe()} "
           f"({pairs['val']} pairs a set); test: best.pt scored once ({pairs['test']} pairs a set)",
           "", head]
    for arm, st in summary["arms"].items():
        mark = " **(chosen on val)**" if arm == best else ""
        cells = [_fmt(st[f"{p}_acc"]) for p in val] + [_fmt(st[f"{TEST_PREFIX}{p}_acc"]) for p in rep]
        out.append(f"| {arm_label(arm)}{mark} | " + " | ".join(cells) + f" | {st['epoch']} |")
    out += ["", f"Paired difference to the baseline of the same seed, points, on {HARDEST}: mean ± SE "
                f"over {n} seeds, 95 % interval and p-value of the paired t-test; the last columns "
                f"resample test pairs too (bootstrap over seeds and pairs)", "",
            "| arm | validation | test | test 95 % CI | p | signs | CI, seeds and pairs | p, seeds and pairs |",
            "|---|---:|---:|---|---:|---|---|---:|"]
    for arm, g in summary["gains"].items():
        out.append(_comparison_row(arm_label(arm), g["val"], g["test"]))
    d = summary["virface_minus_virclass"]
    out.append(_comparison_row(f"VirFace ({best.split(':', 1)[1]}, chosen on validation) - VirClass", None, d))
    share = summary["oracle_share"]
    mde = summary["min_detectable_effect"]
    out += ["", "Share of the oracle's gain VirFace captures: "
                + (f"{100 * share:.0f} %" if share is not None else "- (no oracle gain)"),
            "Minimum detectable effect of VirClass - baseline on test (two-sided 5 %, 80 % power): "
            + (f"{mde['value']:.2f} points" if mde["value"] is not None else "- (one seed)")
            + f" (paired t over seeds {_num(mde['paired_t_over_seeds'])}, pairs only "
              f"{_num(mde['pairs_only'])}, seeds and pairs {_num(mde['seeds_and_pairs'])})"]
    return "\n".join(out) + "\n"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _comparison_row(label: str, val: dict[str, Any] | None, t: dict[str, Any]) -> str:
    def pm(c):
        return f"{c['mean']:+.2f}" + (f" ± {c['se']:.2f}" if c.get("se") is not None else "")

    sp = t.get("seeds_and_pairs") or {}
    return (f"| {label} | {pm(val) if val else '-'} | {pm(t)} | {_interval(t['ci95'])} | {_p(t['p_value'])} | "
            f"{t['signs']} | {_interval(sp.get('ci95'))} | {_p(sp.get('p_value'))} |")


def verdict(summary: dict[str, Any]) -> list[str]:
    """Each comparison the issue asks about with its interval, p-value and verdict (paired t-test
    over seeds at 5 %), and the minimum detectable effect (printed, and stored in results.json)."""
    g = summary["gains"]
    best = summary["best_variant"]
    n = len(g["virclass"]["test"]["values"])
    on = f"test {HARDEST}, {n} seeds"

    def line(c, what):
        text = describe(c, f"{what} ({on})")
        if "seeds_and_pairs" in c:
            sp = c["seeds_and_pairs"]
            text += f"; with pair sampling: 95% CI {_interval(sp['ci95'])}, p = {sp['p_value']:.3g}"
        return text

    share = summary["oracle_share"]
    mde = summary["min_detectable_effect"]["value"]
    gates = [f"gate {v}: identity keep {f['vi_identity_keep']:+.3f}, draw cos {f['vi_draw_cos']:.3f} "
             f"(real {f['vi_real_cos']:.3f}), mean of {f['seeds']} seeds: "
             + ("kept identity on every seed" if f["kept_identity_every_seed"] else "LOSES IDENTITY")
             for v, f in summary.get("gates", {}).items()]
    return gates + [line(g["virclass"]["test"], "VirClass - baseline"),
            line(summary["virface_minus_virclass"], f"VirFace ({best.split(':', 1)[1]}) - VirClass"),
            line(g["oracle"]["test"], "oracle - baseline"),
            f"VirFace captures >= 1/3 of the oracle gain: {share is not None and share >= 1 / 3}",
            "minimum detectable effect (two-sided 5 %, 80 % power): "
            + (f"{mde:.2f} points; a 1-point gain is {'visible' if mde <= 1.0 else 'NOT reliably visible'}"
               if mde is not None else "- (one seed)")]


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
        lo, hi = t["ci95"] or (t["mean"], t["mean"])
        ax.errorbar(t["mean"], i, xerr=[[t["mean"] - lo], [hi - t["mean"]]], fmt="o",
                    color="C3" if arm == "oracle" else "C0", capsize=4, zorder=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(arms)), [a.replace("virface:", "VirFace ") for a in arms])
    ax.invert_yaxis()
    ax.set_xlabel(f"test {HARDEST} accuracy minus the baseline's, points (dots: seeds; bar: mean, "
                  "95 % interval of the paired t-test over seeds)")
    ax.set_title("Gain over ArcFace on deep faces only, best.pt by the rule fixed on validation")
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
    p.add_argument("--rule", default=None, metavar="RULE",
                   help="selection rule, fixed before the run: best, last or mean_last:K "
                        "(default: the plan's, mean_last:3)")
    p.add_argument("--val-pairs", type=int, default=None, metavar="N",
                   help="pairs per validation pair set (default: the plan's; a multiple of 20)")
    p.add_argument("--test-pairs", type=int, default=None, metavar="N",
                   help="pairs per test pair set (default: the plan's, 20000 in the full plan; a multiple of 20)")
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
    if args.rule:
        changes["rule"] = args.rule
    sizes = {k: v for k, v in (("val_pairs", args.val_pairs), ("test_pairs", args.test_pairs)) if v}
    if sizes:
        changes["synthetic"] = {**plan.synthetic, **sizes}
    return dataclasses.replace(plan, **changes)


def plan_from_dict(values: dict[str, Any]) -> Plan:
    names = {f.name for f in dataclasses.fields(Plan) if f.init}
    # Results from before the rule and report_sets existed: best epoch, all three sets reported.
    values = {"rule": "best", "report_sets": list(PAIR_SETS), **values}
    return Plan(**{k: (tuple(v) if isinstance(v, list) and k != "synthetic" else v)
                   for k, v in values.items() if k in names})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            results = json.load(f)
        plan = plan_from_dict(results["plan"])
        return write_outputs(results, summarise(results["records"], plan, results.get("eval_cost_s")),
                             plan, args.out)
    try:
        plan = plan_of(args)
        from virface.data.synthetic import SyntheticSpec

        SyntheticSpec.from_dict(plan.synthetic)         # --val-pairs / --test-pairs checked here
    except (ValueError, VirFaceError) as e:
        raise SystemExit(f"shallow_data: {e}") from None
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
    print(f"[{plan.name}] selection rule, fixed before the run: {plan.rule} = "
          f"{parse_rule(plan.rule).describe(f'validation {SELECT_ON}')}; gains reported on "
          f"test {', '.join(plan.report_sets)}", flush=True)
    faces = load_faces(plan, cache)          # built once here; the workers read the cache
    roles = check_roles_apart(faces)
    eval_cost = measure_eval_cost(plan, faces)
    pairs = n_pairs(plan)
    print("evaluation cost here (s per evaluation, one process): " + ", ".join(
        f"{name} ({pairs['test' if name.startswith(TEST_PREFIX) else 'val']} pairs) {sec:.1f}"
        for name, sec in eval_cost.items())
        + "; validation every epoch, test once per run", flush=True)
    print(f"[{plan.name}] deep {len(faces.labeled)} images / {faces.labeled.num_classes} ids, shallow "
          f"{len(faces.unlabeled)} images / {faces.unlabeled.num_classes} ids; identities apart: {roles}; "
          f"{steps_per_epoch(plan)} steps per epoch; arms {', '.join(plan.arms)}; {len(plan.seeds)} seeds, "
          f"{plan.processes} at once (data {time.perf_counter() - start:.0f} s)", flush=True)
    records = run_plan(plan, cache, work, args.threads, log=lambda text: print(text, flush=True),
                       eval_cost=eval_cost)
    summary = summarise(records, plan, eval_cost)
    wall = time.perf_counter() - start
    command = " ".join(["python benchmarks/shallow_data.py", *args.argv])
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
        "wall_s": round(wall, 1), "command": command, "eval_cost_s": eval_cost,
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
