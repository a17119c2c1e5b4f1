"""Does unlabeled shallow data help? ArcFace vs VirClass vs VirFace on the built-in synthetic faces.

Protocol (per training seed; the data are generated once from a fixed data seed):
  1. ``pretrain``: ArcFace on the labeled (deep) split from scratch, E1 epochs, constant lr.
  2. ``generator``: the feature VAE on that checkpoint, Eg epochs (backbone and head frozen).
  3. Four continuations of E2 epochs with one lr schedule, all from the same weights:
       baseline           ``pretrain`` continued on labeled data only (plain ArcFace)
       virclass           from the pretrain checkpoint, unlabeled faces as virtual classes
       virface_alternate  from the generator checkpoint, G step then backbone/W step
       virface_joint      from the generator checkpoint, one optimiser over everything
  Every method runs ``steps_per_epoch = ceil(labeled / label_batch_size)`` steps per epoch, so an
  epoch is one pass over the labeled split for all of them (same steps, same labeled batches:
  the batch order depends only on the seed); VirClass/VirFace add ``unlabel_batch_size``
  unlabeled faces to each step. The FINAL epoch is evaluated (no epoch is picked on the
  test pairs), on synth_lfw, synth_cfp_ff and synth_cfp_fp (10-fold accuracy, TAR@FAR=1e-3).
  Ablations (VirFace alternate): ``gen_num`` and the fraction of unlabeled identities kept
  (0 % is the baseline continuation: no unlabeled faces means no virtual classes or instances).

    python benchmarks/shallow_data.py            # full: 3 seeds + ablations, ~18 min on 2 cores
    python benchmarks/shallow_data.py --quick    # 1 seed, small data: 40 s quiet, minutes loaded
    python benchmarks/shallow_data.py --smoke    # tiny data, 1-step epochs; what the test runs
    python benchmarks/shallow_data.py --diagnostics   # variants (dropout, lr) and geometry
    python benchmarks/shallow_data.py --oracle        # the unlabeled faces with true identities
    python benchmarks/shallow_data.py --from-json docs/shallow_data/results.json   # replot only

Writes ``results.json`` (every run: config, final metrics, per-epoch training losses, wall time),
``table.md`` and ``methods.png``, ``gen_num.png``, ``unlabeled.png`` into ``--out``
(default docs/shallow_data) and prints the tables; ``--diagnostics`` / ``--oracle`` write
``diagnostics.{json,md}`` / ``oracle.{json,md}`` there instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from virface.config import TrainConfig  # noqa: E402
from virface.data.loading import StageData  # noqa: E402
from virface.data.sources import ArraySource  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from virface.data.synthetic import PAIR_SET_NAMES as PAIR_SETS  # noqa: E402
METHODS = ("baseline", "virclass", "virface_alternate", "virface_joint")
METHOD_LABELS = {"pretrain_start": "start (pretrain checkpoint)",
                 "baseline": "ArcFace baseline (labeled only)",
                 "virclass": "VirClass",
                 "virface_alternate": "VirFace, alternate",
                 "virface_joint": "VirFace, joint"}
UNLABELED_SUBSET_SEED = 12345     # which unlabeled identities a fraction keeps: fixed, not per seed


@dataclass
class Plan:
    """One benchmark size. Hyperparameters are the same for every method; see the module doc."""

    name: str
    synthetic: dict[str, Any]
    seeds: tuple[int, ...]
    pretrain_epochs: int
    generator_epochs: int
    continue_epochs: int
    continue_decay_epochs: tuple[int, ...]    # lr x gamma after these continuation epochs
    ablation_seeds: tuple[int, ...]
    gen_nums: tuple[int, ...] = (0, 1, 5, 10)
    unlabeled_percents: tuple[int, ...] = (0, 25, 50, 100)
    label_batch_size: int = 64
    unlabel_batch_size: int = 64
    pretrain_lr: float = 0.1
    generator_lr: float = 0.1
    continue_lr: float = 0.05
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    s: float = 32.0
    m: float = 0.3
    dropout: float = 0.5          # labeled-feature dropout of virclass/virface (the reference's)
    gen_num: int = 5
    KL: float = 2.0
    L2: float = 5e3
    arch: str = "mobilefacenet_s"
    feat_len: int = 512
    steps_per_epoch: int | None = None   # None: ceil(labeled / label_batch_size), one labeled pass


PLANS = {
    "full": Plan(
        name="full",
        synthetic=dict(image_size=32, seed=0, n_labeled_ids=100, images_per_labeled_id=20,
                       n_unlabeled_ids=2000, unlabeled_images_per_id=(1, 3), n_val_ids=400,
                       val_pairs=2000),
        seeds=(0, 1, 2), pretrain_epochs=15, generator_epochs=15, continue_epochs=10,
        continue_decay_epochs=(6, 8), ablation_seeds=(0, 1, 2)),
    "quick": Plan(
        name="quick",
        synthetic=dict(image_size=32, seed=0, n_labeled_ids=50, images_per_labeled_id=10,
                       n_unlabeled_ids=500, unlabeled_images_per_id=(1, 3), n_val_ids=100,
                       val_pairs=600),
        seeds=(0,), pretrain_epochs=6, generator_epochs=6, continue_epochs=3,
        continue_decay_epochs=(2,), ablation_seeds=(0,)),
    "smoke": Plan(
        name="smoke",
        synthetic=dict(image_size=16, seed=0, n_labeled_ids=6, images_per_labeled_id=4,
                       n_unlabeled_ids=12, unlabeled_images_per_id=(1, 2), n_val_ids=20,
                       val_pairs=40),
        seeds=(0,), pretrain_epochs=1, generator_epochs=1, continue_epochs=1,
        continue_decay_epochs=(), ablation_seeds=(0,), gen_nums=(0, 5), unlabeled_percents=(0, 50, 100),
        label_batch_size=8, unlabel_batch_size=8, feat_len=64, steps_per_epoch=1),
}


# ---------------------------------------------------------------------------------------- data

def build_data(plan: Plan, cache_dir: str) -> tuple[StageData, Any]:
    """The plan's synthetic faces as StageData (all unlabeled faces), and the SyntheticFaces."""
    from virface.data.synthetic import SyntheticSpec, load_synthetic

    spec = SyntheticSpec.from_dict(plan.synthetic)
    faces = load_synthetic(spec, cache_dir=cache_dir)
    return StageData(faces.labeled, faces.unlabeled, dict(faces.pair_sets), spec.image_size), faces


def unlabeled_subset(data: StageData, percent: int) -> StageData:
    """Keep ``percent`` % of the unlabeled identities (all images of each kept one), so the
    subset stays shallow; the kept identities are nested (25 % is inside 50 %) and fixed."""
    source = data.unlabeled
    n_ids = source.num_classes
    order = np.random.default_rng(UNLABELED_SUBSET_SEED).permutation(n_ids)
    keep_ids = order[:max(1, round(n_ids * percent / 100))]
    indices = np.flatnonzero(np.isin(source.labels, keep_ids))
    return dataclasses.replace(data, unlabeled=source.subset(indices, f"{source.name}[{percent}%]"))


# --------------------------------------------------------------------------------- evaluation

def evaluate_checkpoint(path: str, data: StageData) -> dict[str, float]:
    """10-fold verification of the backbone saved in ``path`` on every pair set of ``data``."""
    from virface.checkpoint import load_backbone
    from virface.evaluation.verification import evaluate_pair_sets

    return evaluate_pair_sets(load_backbone(path)[0], data.pair_sets)


# ------------------------------------------------------------------------------------ training

def base_config(plan: Plan, seed: int, steps_per_epoch: int) -> TrainConfig:
    return TrainConfig(
        arch=plan.arch, feat_len=plan.feat_len, s=plan.s, m=plan.m, dropout=plan.dropout,
        gen_num=plan.gen_num, KL=plan.KL, L2=plan.L2, label_batch_size=plan.label_batch_size,
        unlabel_batch_size=plan.unlabel_batch_size, steps_per_epoch=steps_per_epoch,
        momentum=plan.momentum, weight_decay=plan.weight_decay, gamma=plan.gamma,
        synthetic=plan.synthetic, eval=False, tensorboard=False, device="cpu", seed=seed,
        loader_workers=0)


def train_history(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-epoch training figures (losses, lr, throughput) of a run, rounded for the JSON."""
    keep = ("epoch", "loss", "loss_arcface", "loss_vc", "loss_vi", "gen_mse", "gen_kl", "gen_loss",
            "lr", "steps", "samples_per_s", "epoch_time_s")
    return [{k: (round(h[k], 6) if isinstance(h[k], float) else h[k]) for k in keep if k in h}
            for h in history]


class Runner:
    """Runs stages into numbered folders under ``work`` and keeps one record per run."""

    def __init__(self, plan: Plan, data: StageData, work: str, log=print):
        self.plan, self.data, self.work, self.log = plan, data, work, log
        self.steps_per_epoch = plan.steps_per_epoch or math.ceil(len(data.labeled) / plan.label_batch_size)
        self.records: list[dict[str, Any]] = []
        self._n = 0

    def stage(self, name: str, config: TrainConfig, data: StageData) -> tuple[Any, float]:
        from virface.stages import run_stage

        self._n += 1
        run_dir = os.path.join(self.work, f"{self._n:03d}-{name}")
        start = time.perf_counter()
        result = run_stage(config, run_dir, data=data, keep_epoch_checkpoints=False)
        return result, time.perf_counter() - start

    def record(self, kind: str, seed: int, config: TrainConfig, result, wall_s: float,
               data: StageData, **extra) -> dict[str, Any]:
        start = time.perf_counter()
        final = evaluate_checkpoint(result.last_checkpoint, data)
        rec = {"kind": kind, "seed": seed, **extra, "final": final,
               "train": train_history(result.history), "train_wall_s": round(wall_s, 2),
               "eval_wall_s": round(time.perf_counter() - start, 2),
               "config": {k: v for k, v in config.to_dict().items()
                          if k in ("method", "optim_mode", "lr", "g_lr", "decay_steps", "max_epoch",
                                   "gen_num", "dropout", "s", "m", "KL", "L2",
                                   "label_batch_size", "unlabel_batch_size", "steps_per_epoch",
                                   "momentum", "weight_decay", "seed")},
               "n_unlabeled_images": len(data.unlabeled) if config.uses_unlabeled else 0,
               "checkpoint": result.last_checkpoint}
        self.records.append(rec)
        accs = " ".join(f"{n[6:]}={final[n + '_acc']:.4f}" for n in PAIR_SETS if n + "_acc" in final)
        self.log(f"  seed {seed} {kind:<18} {_extra_text(extra):<16} {accs}  "
                 f"(train {wall_s:.0f} s, eval {rec['eval_wall_s']:.0f} s)")
        return rec

    def run_starts(self, seed: int) -> dict[str, str]:
        """Pretrain and generator for one seed; returns their final checkpoints."""
        plan, data = self.plan, self.data
        cfg = base_config(plan, seed, self.steps_per_epoch)
        pre_cfg = cfg.replace(method="pretrain", lr=plan.pretrain_lr, max_epoch=plan.pretrain_epochs,
                              decay_steps=(plan.pretrain_epochs + 1,))     # no decay in pretrain
        pre, wall = self.stage(f"seed{seed}-pretrain", pre_cfg, data)
        self.record("pretrain_start", seed, pre_cfg, pre, wall, data)

        gen_cfg = cfg.replace(method="generator", lr=plan.generator_lr, max_epoch=plan.generator_epochs,
                              decay_steps=(plan.generator_epochs + 1,), pretrained_file=pre.last_checkpoint)
        gen, gen_wall = self.stage(f"seed{seed}-generator", gen_cfg, data)
        last = gen.history[-1]
        self.records.append({"kind": "generator", "seed": seed, "train": train_history(gen.history),
                             "train_wall_s": round(gen_wall, 2)})
        self.log(f"  seed {seed} generator          gen_mse={last['gen_mse']:.3g} "
                 f"(mean cos(G(x), W_y) = {1 - last['gen_mse'] * plan.feat_len / 2:.3f}) "
                 f"gen_kl={last['gen_kl']:.3g} (train {gen_wall:.0f} s)")
        return {"pretrain": pre.last_checkpoint, "generator": gen.last_checkpoint}

    def run_seed(self, seed: int) -> dict[str, str]:
        """Pretrain, generator and the four methods for one seed; returns the start checkpoints."""
        starts = self.run_starts(seed)
        for kind in METHODS:
            self.continuation(kind, seed, starts)
        return starts

    def continuation_config(self, kind: str, seed: int, starts: dict[str, str], **overrides) -> TrainConfig:
        plan = self.plan
        cfg = base_config(plan, seed, self.steps_per_epoch).replace(
            lr=plan.continue_lr, max_epoch=plan.continue_epochs,
            decay_steps=plan.continue_decay_epochs or (plan.continue_epochs + 1,))
        if kind == "baseline":
            cfg = cfg.replace(method="pretrain", pretrained_file=starts["pretrain"])
        elif kind == "virclass":
            cfg = cfg.replace(method="virclass", pretrained_file=starts["pretrain"])
        else:
            cfg = cfg.replace(method="virface", optim_mode=kind.split("_", 1)[1],
                              pretrained_file=starts["generator"])
        return cfg.replace(**overrides)

    def continuation(self, kind: str, seed: int, starts: dict[str, str], data: StageData | None = None,
                     extra: dict[str, Any] | None = None, **overrides) -> dict[str, Any]:
        data = data or self.data
        cfg = self.continuation_config(kind, seed, starts, **overrides)
        tag = "-".join(f"{k}{v}" for k, v in (extra or {}).items())
        result, wall = self.stage(f"seed{seed}-{kind}{'-' + tag if tag else ''}", cfg, data)
        return self.record(kind, seed, cfg, result, wall, data, **(extra or {}))

    def run_ablations(self, seed: int, starts: dict[str, str]) -> None:
        """VirFace alternate over gen_num and over the unlabeled fraction. The plan's own gen_num
        at 100 % is the main run of this seed, and 0 % unlabeled is its baseline run; both are
        reused, not rerun."""
        for gen_num in self.plan.gen_nums:
            if gen_num != self.plan.gen_num:
                self.continuation("virface_alternate", seed, starts, extra={"gen_num": gen_num},
                                  gen_num=gen_num)
        for percent in self.plan.unlabeled_percents:
            if percent not in (0, 100):
                self.continuation("virface_alternate", seed, starts,
                                  data=unlabeled_subset(self.data, percent),
                                  extra={"unlabeled_percent": percent})


def _extra_text(extra: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in extra.items())


# --------------------------------------------------------------------------------- diagnostics
# Not part of the benchmark: variants and measurements that explain its numbers. Each variant
# changes one thing against the main protocol and runs next to its own reference runs.

DIAGNOSTIC_VARIANTS = (
    # (name, kind, overrides): the main runs first, then one change each.
    ("baseline", "baseline", {}),
    ("virclass", "virclass", {}),
    ("virface_alternate", "virface_alternate", {}),
    ("virclass, dropout 0", "virclass", {"dropout": 0.0}),
    ("virface_alternate, dropout 0", "virface_alternate", {"dropout": 0.0}),
    ("baseline, lr 0.01", "baseline", {"lr": 0.01}),
    ("virclass, lr 0.01", "virclass", {"lr": 0.01}),
    ("virface_alternate, lr 0.01", "virface_alternate", {"lr": 0.01}),
)


@torch.no_grad()
def virtual_geometry(path: str, data: StageData, plan: Plan, generator_path: str | None = None,
                     n_labeled: int = 512, n_batches: int = 8, seed: int = 0) -> dict[str, float]:
    """Where the labeled features, virtual classes and virtual instances sit, for the weights in
    ``path`` (backbone in eval mode). Cosines are between L2-normalised vectors; U =
    ``plan.unlabel_batch_size`` unlabeled faces form one batch of virtual classes, as in training.

    Returns means over labeled samples / virtual instances of:
      cos_x_Wy          cos(x, W_y): how well features sit on their class weight (G's target)
      max_cos_x_Wneg    the hardest real negative, max over j != y of cos(x, W_j)
      max_cos_x_virtual the hardest virtual negative, max over the U virtual centres of cos(x, u)
      virtual_softmax   softmax mass (scale s, no margin) on the U virtual classes among C + U
      ce_arcface / ce_virclass   the ArcFace CE of x against W, and against [W; u] (no dropout)
    and, with a generator (``generator_path``, or the one in ``path``): gen_num instances per u,
      cos_Gx_Wy         labeled x: cos(G's instance of x, W_y), what G is trained for
      cos_Gx_x          labeled x: cos(G's instance of x, x)
      cos_inst_own      cos(instance, its own centre u)
      max_cos_inst_W    cos(instance, nearest labeled class weight)
      own_top1          fraction of instances whose nearest centre among [W; u] is their own
      ce_virinstance    the VirInstance CE (the loss_vi of training, without the randomness of G)
    """
    from virface.checkpoint import load_backbone, load_checkpoint, load_module_state, model_meta
    from virface.data.images import normalize_pixels
    from virface.generator import FeatureVAE
    from virface.heads import virclass_logits, virinstance_logits

    backbone, state = load_backbone(path)
    meta = model_meta(state, path)
    weight = state["head"]["weight"].float()
    gen_state = load_checkpoint(generator_path)["generator"] if generator_path else state.get("generator")
    generator = None
    if gen_state is not None:
        generator = FeatureVAE(meta["feat_len"])
        load_module_state(generator, gen_state, "generator", generator_path or path)
        generator.eval()

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    def embed(source, idx):
        x = normalize_pixels(torch.from_numpy(source.images[np.sort(idx)]).permute(0, 3, 1, 2))
        return backbone(x), torch.from_numpy(source.labels[np.sort(idx)])

    lab_idx = rng.choice(len(data.labeled), min(n_labeled, len(data.labeled)), replace=False)
    x, y = embed(data.labeled, lab_idx)
    u_batch = plan.unlabel_batch_size
    n_u = min(len(data.unlabeled), n_batches * u_batch)
    u, _ = embed(data.unlabeled, rng.choice(len(data.unlabeled), n_u, replace=False))
    xn, wn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(weight, dim=1)
    cos_w = xn @ wn.t()
    out = {"cos_x_Wy": float(cos_w.gather(1, y[:, None]).mean()),
           "max_cos_x_Wneg": float(cos_w.scatter(1, y[:, None], -2.0).amax(1).mean())}
    ce = torch.nn.functional.cross_entropy
    from virface.heads import arcface_margin_logits
    out["ce_arcface"] = float(ce(arcface_margin_logits(cos_w, y, plan.s, plan.m), y))
    if generator is not None:
        gx = generator.sample(xn, 1)
        out["cos_Gx_Wy"] = float((gx * wn[y]).sum(1).mean())
        out["cos_Gx_x"] = float((gx * xn).sum(1).mean())
    sums = {k: [] for k in ("max_cos_x_virtual", "virtual_softmax", "ce_virclass", "cos_inst_own",
                            "max_cos_inst_W", "own_top1", "ce_virinstance")}
    n_classes = weight.shape[0]
    for b in range(0, n_u - u_batch + 1, u_batch):
        ub = u[b:b + u_batch]
        logits = virclass_logits(x, y, weight, ub, plan.s, plan.m)
        cos_u = xn @ torch.nn.functional.normalize(ub, dim=1).t()
        sums["max_cos_x_virtual"].append(float(cos_u.amax(1).mean()))
        plain = torch.softmax(plan.s * torch.cat([cos_w, cos_u], 1), dim=1)
        sums["virtual_softmax"].append(float(plain[:, n_classes:].sum(1).mean()))
        sums["ce_virclass"].append(float(ce(logits, y)))
        if generator is not None and plan.gen_num:
            un = torch.nn.functional.normalize(ub, dim=1)
            inst = generator.sample(un, plan.gen_num)
            own = un.repeat(plan.gen_num, 1)
            sums["cos_inst_own"].append(float((inst * own).sum(1).mean()))
            sums["max_cos_inst_W"].append(float((inst @ wn.t()).amax(1).mean()))
            logits_vi, target = virinstance_logits(inst, weight, ub, plan.gen_num, plan.s, plan.m)
            all_cos = inst @ torch.cat([wn, un]).t()
            sums["own_top1"].append(float((all_cos.argmax(1) == target).float().mean()))
            sums["ce_virinstance"].append(float(ce(logits_vi, target)))
    out.update({k: float(np.mean(v)) for k, v in sums.items() if v})
    return out


def run_diagnostics(runner: "Runner", seeds: tuple[int, ...]) -> dict[str, Any]:
    """The DIAGNOSTIC_VARIANTS per seed, with geometry at the start and end of the main runs."""
    plan, data = runner.plan, runner.data
    rows: list[dict[str, Any]] = []
    geometry: list[dict[str, Any]] = []
    for seed in seeds:
        starts = runner.run_starts(seed)
        geometry.append({"seed": seed, "at": "start (generator checkpoint)",
                         **virtual_geometry(starts["generator"], data, plan)})
        for name, kind, overrides in DIAGNOSTIC_VARIANTS:
            rec = runner.continuation(kind, seed, starts, extra={"variant": name}, **overrides)
            rows.append(rec)
            if not overrides and kind != "baseline":
                geometry.append({"seed": seed, "at": f"end of {kind}", **virtual_geometry(
                    rec["checkpoint"], data, plan, generator_path=(
                        starts["generator"] if kind == "virclass" else None))})
    return {"variants": rows, "geometry": geometry}


def run_oracle(runner: "Runner", seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """Does this data reward seeing more identities at all? The unlabeled faces WITH their true
    identities join the labeled ones (100 + 2000 classes) in plain ArcFace, pretrain and
    continuation as in the main protocol but with batch 128 (VirFace's 64 + 64 images per step);
    the control is the same on the labeled faces alone. Both from scratch, same steps and lr."""
    plan, data = runner.plan, runner.data
    lab, unl = data.labeled, data.unlabeled
    union = ArraySource(np.concatenate([lab.images, unl.images]),
                        np.concatenate([lab.classes[lab.labels], unl.classes[unl.labels]]),
                        "synthetic:labeled+unlabeled(true ids)")
    batch = plan.label_batch_size + plan.unlabel_batch_size
    rows = []
    for seed in seeds:
        for name, labeled in (("control: labeled only, batch 128", lab), ("oracle: labeled + unlabeled with true ids, batch 128", union)):
            d = dataclasses.replace(data, labeled=labeled, unlabeled=None)
            cfg = base_config(plan, seed, runner.steps_per_epoch).replace(label_batch_size=batch)
            pre_cfg = cfg.replace(method="pretrain", lr=plan.pretrain_lr, max_epoch=plan.pretrain_epochs,
                                  decay_steps=(plan.pretrain_epochs + 1,))
            pre, wall = runner.stage(f"seed{seed}-oracle-pretrain", pre_cfg, d)
            runner.record("pretrain_start", seed, pre_cfg, pre, wall, d, variant=name)
            cont_cfg = cfg.replace(method="pretrain", lr=plan.continue_lr, max_epoch=plan.continue_epochs,
                                   decay_steps=plan.continue_decay_epochs or (plan.continue_epochs + 1,),
                                   pretrained_file=pre.last_checkpoint)
            cont, wall = runner.stage(f"seed{seed}-oracle-continue", cont_cfg, d)
            rows.append(runner.record("baseline", seed, cont_cfg, cont, wall, d, variant=name,
                                      n_classes=int(labeled.num_classes)))
    return rows


def oracle_table(rows: list[dict[str, Any]], main_baseline: dict[str, Any] | None) -> str:
    out = ["Oracle: final-epoch accuracy % (mean ± std over seeds), after pretrain + continuation",
           "", "| run | classes | synth_lfw | synth_cfp_ff | synth_cfp_fp |", "|---|---|---|---|---|"]
    if main_baseline:
        out.append("| main-table ArcFace baseline (batch 64) | 100 | "
                   + " | ".join(_fmt(main_baseline[f"{p}_acc"]) for p in PAIR_SETS) + " |")
    for name in dict.fromkeys(r["variant"] for r in rows):
        recs = [r for r in rows if r["variant"] == name]
        out.append(f"| {name} | {recs[0]['n_classes']} | "
                   + " | ".join(_fmt(_mean_std([r["final"][f"{p}_acc"] for r in recs])) for p in PAIR_SETS) + " |")
    return "\n".join(out) + "\n"


def diagnostics_tables(diag: dict[str, Any]) -> str:
    variants = [name for name, _, _ in DIAGNOSTIC_VARIANTS]
    out = ["Diagnostic variants: final-epoch accuracy %, and the last epoch's training losses "
           "(mean ± std over seeds)", "",
           "| variant | synth_lfw | synth_cfp_ff | synth_cfp_fp | loss (CE of labeled) | loss_vi |",
           "|---|---|---|---|---|---|"]
    for name in variants:
        recs = [r for r in diag["variants"] if r["variant"] == name]
        accs = [_fmt(_mean_std([r["final"][f"{p}_acc"] for r in recs])) for p in PAIR_SETS]
        ce_key = "loss_arcface" if recs[0]["kind"] == "baseline" else "loss_vc"
        ce = _mean_std([r["train"][-1][ce_key] for r in recs])
        vi = [r["train"][-1]["loss_vi"] for r in recs if "loss_vi" in r["train"][-1]]
        vi_text = f"{np.mean(vi):.2f}" if vi else "-"
        out.append(f"| {name} | " + " | ".join(accs) + f" | {ce['mean']:.2f} ({ce_key}) | {vi_text} |")
    keys = [k for k in diag["geometry"][0] if k not in ("seed", "at")]
    out += ["", "Geometry (backbone in eval mode; means over seeds)", "",
            "| at | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for at in dict.fromkeys(g["at"] for g in diag["geometry"]):
        gs = [g for g in diag["geometry"] if g["at"] == at]
        cells = [f"{np.mean([g[k] for g in gs if k in g]):.3f}" if any(k in g for g in gs) else "-"
                 for k in keys]
        out.append(f"| {at} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- summary

def _mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "n": len(arr), "values": [float(v) for v in arr]}


def _is_main_run(rec: dict[str, Any]) -> bool:
    return "gen_num" not in rec and "unlabeled_percent" not in rec and "final" in rec


def summarise(records: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Mean and sample std over seeds of every final metric: per method, and per ablation point."""
    metrics = [f"{n}_{k}" for n in PAIR_SETS for k in ("acc", "tar_far1e-3")]

    def stats(recs):
        return {m: _mean_std([r["final"][m] for r in recs]) for m in metrics}

    main = {kind: stats([r for r in records if r["kind"] == kind and _is_main_run(r)])
            for kind in ("pretrain_start", *METHODS)}
    seeds = set(plan.ablation_seeds)

    def ablation_point(seed: int, key: str, value: int) -> dict[str, Any]:
        if key == "unlabeled_percent" and value == 0:
            kind, main_run = "baseline", True
        else:
            kind = "virface_alternate"
            main_run = value == (plan.gen_num if key == "gen_num" else 100)
        return next(r for r in records if r["kind"] == kind and r["seed"] == seed
                    and (_is_main_run(r) if main_run else r.get(key) == value))

    gen_num = {str(g): stats([ablation_point(s, "gen_num", g) for s in sorted(seeds)])
               for g in plan.gen_nums}
    unlabeled = {str(p): stats([ablation_point(s, "unlabeled_percent", p) for s in sorted(seeds)])
                 for p in plan.unlabeled_percents}
    # Paired differences against the baseline of the same seed (same start, same labeled batches).
    paired = {}
    for kind in METHODS[1:]:
        diffs = {}
        for m in metrics:
            d = []
            for r in records:
                if r["kind"] == kind and _is_main_run(r):
                    b = next(x for x in records if x["kind"] == "baseline" and x["seed"] == r["seed"]
                             and _is_main_run(x))
                    d.append(r["final"][m] - b["final"][m])
            diffs[m] = _mean_std(d)
        paired[kind] = diffs
    return {"methods": main, "paired_vs_baseline": paired, "gen_num": gen_num,
            "unlabeled_percent": unlabeled, "ablation_seeds": sorted(seeds)}


def _fmt(st: dict[str, float], scale: float = 100.0) -> str:
    return f"{st['mean'] * scale:.2f} ± {st['std'] * scale:.2f}"


def markdown_tables(summary: dict[str, Any], plan: Plan) -> str:
    n = summary["methods"]["baseline"]["synth_lfw_acc"]["n"]
    head = ("| method | synth_lfw acc | synth_cfp_ff acc | synth_cfp_fp acc | "
            "synth_lfw TAR | synth_cfp_ff TAR | synth_cfp_fp TAR |\n|---|---|---|---|---|---|---|")
    out = [f"Final-epoch verification, % (mean ± std over {n} seed(s); TAR = TAR@FAR=1e-3)", "",
           head]
    for kind, st in summary["methods"].items():
        cells = [_fmt(st[f"{p}_acc"]) for p in PAIR_SETS] + [_fmt(st[f"{p}_tar_far1e-3"]) for p in PAIR_SETS]
        out.append(f"| {METHOD_LABELS[kind]} | " + " | ".join(cells) + " |")
    out += ["", f"Difference to the baseline of the same seed, percentage points (mean ± std over {n} seed(s))",
            "", head]
    for kind, st in summary["paired_vs_baseline"].items():
        cells = [_fmt(st[f"{p}_acc"]) for p in PAIR_SETS] + [_fmt(st[f"{p}_tar_far1e-3"]) for p in PAIR_SETS]
        out.append(f"| {METHOD_LABELS[kind]} | " + " | ".join(cells) + " |")
    k = len(summary["ablation_seeds"])
    for key, title, unit in (("gen_num", "gen_num", ""), ("unlabeled_percent", "unlabeled identities kept", " %")):
        out += ["", f"VirFace alternate, ablation over {title} (accuracy %, mean ± std over {k} seed(s))", "",
                f"| {title} | synth_lfw acc | synth_cfp_ff acc | synth_cfp_fp acc |\n|---|---|---|---|"]
        for point, st in summary[key].items():
            note = ""
            if key == "unlabeled_percent" and point == "0":
                note = " (= baseline)"
            if (key == "gen_num" and int(point) == plan.gen_num) or (key == "unlabeled_percent" and point == "100"):
                note = " (= main run)"
            out.append(f"| {point}{unit}{note} | " + " | ".join(_fmt(st[f'{p}_acc']) for p in PAIR_SETS) + " |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------- plots

def plot_all(summary: dict[str, Any], plan: Plan, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"pretrain_start": "#bbbbbb", "baseline": "#4c72b0", "virclass": "#dd8452",
               "virface_alternate": "#55a868", "virface_joint": "#c44e52"}
    paths = []
    n = summary["methods"]["baseline"]["synth_lfw_acc"]["n"]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds = list(summary["methods"])
    width = 0.8 / len(kinds)
    for ax, metric, label in ((axes[0], "acc", "accuracy (%)"), (axes[1], "tar_far1e-3", "TAR@FAR=1e-3 (%)")):
        for i, kind in enumerate(kinds):
            st = [summary["methods"][kind][f"{p}_{metric}"] for p in PAIR_SETS]
            x = np.arange(len(PAIR_SETS)) + (i - (len(kinds) - 1) / 2) * width
            mean = np.array([s["mean"] for s in st]) * 100
            ax.bar(x, mean, width, yerr=np.array([s["std"] for s in st]) * 100, capsize=3,
                   color=colours[kind], label=METHOD_LABELS[kind])
            for xi, s in zip(x, st):   # each seed as a dot, so n=3 is visible as n=3
                ax.plot([xi] * len(s["values"]), np.array(s["values"]) * 100, "k.", ms=3)
        ax.set_xticks(np.arange(len(PAIR_SETS)), PAIR_SETS)
        ax.set_ylabel(label)
        lows = [v for kind in kinds for p in PAIR_SETS for v in summary["methods"][kind][f"{p}_{metric}"]["values"]]
        ax.set_ylim(max(0.0, min(lows) * 100 - 5), min(100.0, max(lows) * 100 + 3))
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(kinds), fontsize=8, frameon=False)
    fig.suptitle(f"Final-epoch verification after {plan.continue_epochs} continuation epochs "
                 f"(bars: mean ± std over {n} seed(s); dots: single seeds) [{plan.name}]", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    paths.append(_save(fig, out_dir, "methods.png"))
    plt.close(fig)

    base = summary["methods"]["baseline"]
    vc = summary["methods"]["virclass"]
    k = len(summary["ablation_seeds"])
    for key, xlabel, fname in (("gen_num", "gen_num (virtual instances per virtual class)", "gen_num.png"),
                               ("unlabeled_percent", "unlabeled identities used (%)", "unlabeled.png")):
        fig, axes = plt.subplots(1, len(PAIR_SETS), figsize=(13, 4), sharey=True)
        xs = [int(p) for p in summary[key]]
        for ax, p in zip(axes, PAIR_SETS):
            st = [summary[key][str(x)][f"{p}_acc"] for x in xs]
            ax.errorbar(xs, [s["mean"] * 100 for s in st], yerr=[s["std"] * 100 for s in st],
                        marker="o", capsize=3, color=colours["virface_alternate"], label="VirFace, alternate")
            for ref, name, ls in ((base, "baseline", "--"), (vc, "virclass", ":")):
                ax.axhline(ref[f"{p}_acc"]["mean"] * 100, color=colours[name], ls=ls,
                           label=METHOD_LABELS[name] + " (mean)")
            ax.set_title(p)
            ax.set_xlabel(xlabel)
            ax.set_xticks(xs)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.suptitle(f"VirFace alternate: accuracy against {key} (mean ± std over {k} seed(s)) "
                     f"[{plan.name}]", fontsize=10)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        paths.append(_save(fig, out_dir, fname))
        plt.close(fig)
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 seed, small data, a few minutes")
    mode.add_argument("--smoke", action="store_true", help="tiny data, 1-step epochs (the test)")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "shallow_data"),
                   help="folder for results.json, table.md and the PNGs")
    p.add_argument("--work", default=None,
                   help="folder for the run folders (checkpoints); default: a temporary folder, deleted")
    p.add_argument("--cache-dir", default=None,
                   help="synthetic data cache; default $VIRFACE_CACHE_DIR, else inside the work folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two threads spin "
                        "against other jobs and ran 20x slower per step than one)")
    p.add_argument("--no-ablations", action="store_true", help="only the four methods")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the plan's seeds")
    p.add_argument("--from-json", default=None, metavar="RESULTS_JSON",
                   help="train nothing: rewrite table.md and the PNGs from an earlier results.json")
    p.add_argument("--diagnostics", action="store_true",
                   help="instead of the benchmark: the diagnostic variants and geometry "
                        "(writes diagnostics.json / diagnostics.md)")
    p.add_argument("--oracle", action="store_true",
                   help="instead of the benchmark: ArcFace with the unlabeled faces' true identities, "
                        "and its control (writes oracle.json / oracle.md)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(args.seeds),
                                   ablation_seeds=tuple(s for s in plan.ablation_seeds if s in args.seeds))
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        return replot(args.from_json, args.out)
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
    data, faces = build_data(plan, cache)
    data_s = time.perf_counter() - start
    runner = Runner(plan, data, work)
    print(f"[{plan.name}] labeled {len(data.labeled)} images / {data.labeled.num_classes} ids, "
          f"unlabeled {len(data.unlabeled)} images / {data.unlabeled.num_classes} ids, "
          f"{len(data.pair_sets)} pair sets x {plan.synthetic['val_pairs']} pairs "
          f"(data {data_s:.0f} s); {runner.steps_per_epoch} steps per epoch", flush=True)
    if args.diagnostics:
        return _run_diagnostics(plan, args, runner, start, load_start)
    if args.oracle:
        return _run_oracle(plan, args, runner, start, load_start)
    for seed in plan.seeds:
        starts = runner.run_seed(seed)
        if not args.no_ablations and seed in plan.ablation_seeds:
            runner.run_ablations(seed, starts)
    if args.no_ablations:
        plan = dataclasses.replace(plan, gen_nums=(plan.gen_num,), unlabeled_percents=(0, 100))
    summary = summarise(runner.records, plan)
    table = markdown_tables(summary, plan)
    wall = time.perf_counter() - start
    results = {
        "plan": dataclasses.asdict(plan),
        "protocol": __doc__,
        "data": {"labeled_images": len(data.labeled), "labeled_ids": int(data.labeled.num_classes),
                 "unlabeled_images": len(data.unlabeled), "unlabeled_ids": int(data.unlabeled.num_classes),
                 "pairs_per_set": int(plan.synthetic["val_pairs"]), "renderer_version": RENDERER_VERSION,
                 "data_seed": plan.synthetic["seed"], "unlabeled_subset_seed": UNLABELED_SUBSET_SEED},
        "steps_per_epoch": runner.steps_per_epoch,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "wall_s": round(wall, 1),
        "command": "python benchmarks/shallow_data.py" + (f" --{plan.name}" if plan.name != "full" else "")
                   + (" --no-ablations" if args.no_ablations else ""),
        "summary": summary,
        "records": [{k: v for k, v in r.items() if k != "checkpoint"} for r in runner.records],
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plot_all(summary, plan, args.out)
    print()
    print(table)
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); outputs in {args.out}")
    return results


def replot(results_json: str, out_dir: str) -> dict[str, Any]:
    """table.md and the PNGs again from a results.json (its summary; nothing is recomputed)."""
    with open(results_json) as f:
        results = json.load(f)
    plan_dict = dict(results["plan"])
    for key in ("seeds", "continue_decay_epochs", "ablation_seeds", "gen_nums", "unlabeled_percents"):
        plan_dict[key] = tuple(plan_dict[key])
    plan = Plan(**plan_dict)
    table = markdown_tables(results["summary"], plan)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    plot_all(results["summary"], plan, out_dir)
    print(table)
    return results


def _run_oracle(plan: Plan, args, runner: Runner, start: float, load_start) -> dict[str, Any]:
    rows = run_oracle(runner, plan.seeds)
    wall = time.perf_counter() - start
    main_json = os.path.join(args.out, "results.json")
    main_baseline = None
    if os.path.isfile(main_json):
        with open(main_json) as f:
            main = json.load(f)
        if main["plan"]["name"] == plan.name:
            main_baseline = main["summary"]["methods"]["baseline"]
    text = oracle_table(rows, main_baseline)
    results = {"plan": dataclasses.asdict(plan), "wall_s": round(wall, 1),
               "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start,
                           "loadavg_end": os.getloadavg()},
               "command": "python benchmarks/shallow_data.py --oracle"
                          + (f" --{plan.name}" if plan.name != "full" else ""),
               "records": [{k: v for k, v in r.items() if k != "checkpoint"} for r in runner.records]}
    with open(os.path.join(args.out, "oracle.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "oracle.md"), "w") as f:
        f.write(text)
    print()
    print(text)
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); outputs in {args.out}")
    return results


def _run_diagnostics(plan: Plan, args, runner: Runner, start: float, load_start) -> dict[str, Any]:
    diag = run_diagnostics(runner, plan.seeds)
    wall = time.perf_counter() - start
    text = diagnostics_tables(diag)
    results = {"plan": dataclasses.asdict(plan), "wall_s": round(wall, 1),
               "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start,
                           "loadavg_end": os.getloadavg()},
               "command": "python benchmarks/shallow_data.py --diagnostics"
                          + (f" --{plan.name}" if plan.name != "full" else "")
                          + (f" --seeds {' '.join(map(str, plan.seeds))}" if args.seeds else ""),
               "variants": [{k: v for k, v in r.items() if k != "checkpoint"} for r in diag["variants"]],
               "geometry": diag["geometry"],
               "starts": [{k: v for k, v in r.items() if k != "checkpoint"} for r in runner.records
                          if r["kind"] in ("pretrain_start", "generator")]}
    with open(os.path.join(args.out, "diagnostics.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "diagnostics.md"), "w") as f:
        f.write(text)
    print()
    print(text)
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); outputs in {args.out}")
    return results


if __name__ == "__main__":
    main()
