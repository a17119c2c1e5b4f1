"""Calibration of the built-in synthetic faces: does this data reward seeing more people?

Before any method comparison, two checks that the data can show what VirFace is about:

  1. Width curve. Plain ArcFace (``pretrain``) from scratch on labeled sets of different shapes,
     each run 640 SGD steps or 20 passes over its set, whichever is more, same lr schedule:
       - a fixed image budget spread over more or fewer identities (50 x 40 .. 1,000 x 2);
       - a fixed number of images per identity, more identities (100 / 400 / 1,600 x 5).
  2. Oracle. The deep labeled faces (50 identities x 40 images) plus the shallow faces (2,000
     identities x 1-3 images) WITH their true labels, batched the way VirFace batches them
     (``label_batch_size`` deep + ``unlabel_batch_size`` shallow images per step: the library's
     own sampler, via ``StageData.labeled_split``), against the deep faces alone
     (``label_batch_size`` per step); same steps, epochs and lr schedule, and the same training
     seed for both arms. Goal: the oracle gains >= 2 points on the hardest validation pair set
     (synth_cfp_fp) AND the mean gain exceeds 3 paired standard deviations (the sample std over
     seeds of the per-seed differences).

Every number is the FINAL epoch's 10-fold accuracy on the VALIDATION pair sets (ROLE_VAL
identities); the test pair sets are generated minimal and never looked at here. Labeled sets are
nested subsets of generated pools (identities 0..n-1 of the labeled role, the first k images of
each; ``Plan.labeled_pools``). Plain torch and the library's stage loop: nothing here imports Ray
or Optuna, so it runs as is on a GPU machine (training and evaluation go to CUDA when present).

    python benchmarks/data_calibration.py              # full: 3 seeds, ~20 min on 2 CPU cores
    python benchmarks/data_calibration.py --seeds 0 1 2 3 4     # 5 seeds, ~27 min there
    python benchmarks/data_calibration.py --smoke      # tiny data, 1-step epochs; what the test runs

Writes ``calibration.json`` (plan, data specs, every run's final metrics and wall time, the
checks), ``calibration.md`` (the tables) and ``preview.png`` (faces of the first pool, see
``save_preview``) into ``--out`` (default docs/calibration) and prints the tables.
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
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from virface.config import TrainConfig  # noqa: E402
from virface.data.loading import StageData  # noqa: E402
from virface.data.sources import ArraySource  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR_SETS = ("synth_lfw", "synth_cfp_ff", "synth_cfp_fp")
HARDEST = "synth_cfp_fp"
MIN_GAIN_POINTS = 2.0
MIN_GAIN_IN_STDS = 3.0


@dataclass
class Plan:
    """One benchmark size. The training settings are the same for every run."""

    name: str
    data_seed: int
    image_size: int
    n_val_ids: int
    val_pairs: int
    fixed_budget: tuple[tuple[int, int], ...]       # (identities, images each) at one image count
    fixed_depth: tuple[tuple[int, int], ...]        # (identities, images each) at one images-per-id
    width_steps: int                                # SGD steps of a width-curve run, at least ...
    width_min_passes: int                           # ... and at least this many passes over its set
    deep: tuple[int, int]                           # the oracle's labeled split (ids, images each)
    labeled_pools: tuple[tuple[int, int], ...]      # labeled sets generated (ids, images each);
                                                    # every shape is cut from the first that holds it
    n_shallow_ids: int                              # the oracle's shallow identities ...
    shallow_images_per_id: tuple[int, int]          # ... with 1-3 images each, say
    oracle_epochs: int
    seeds: tuple[int, ...]
    width_seed: int = 0
    steps_per_epoch: int = 32                       # cap: one pass over 2,000 deep images at 64
    decay_at: tuple[float, ...] = (0.6, 0.85)       # lr x gamma after these fractions of the epochs
    arch: str = "mobilefacenet_s"
    feat_len: int = 256
    s: float = 32.0
    m: float = 0.4
    lr: float = 0.1
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    label_batch_size: int = 64
    unlabel_batch_size: int = 64
    profile_prob: float | None = None               # None: the SyntheticSpec default
    extra_spec: dict[str, Any] = field(default_factory=dict)

    def pool_specs(self) -> list[dict[str, Any]]:
        """The SyntheticSpec fields of the data sets every run draws from, one per labeled pool.

        The first also holds the shallow split and the validation pair sets; the others carry
        minimal held-out sets. The test pair sets are minimal everywhere: never looked at here.
        """
        specs = []
        for i, (n_ids, per_id) in enumerate(self.labeled_pools):
            spec = dict(image_size=self.image_size, seed=self.data_seed, n_labeled_ids=n_ids,
                        images_per_labeled_id=per_id, n_unlabeled_ids=self.n_shallow_ids if i == 0 else 0,
                        unlabeled_images_per_id=self.shallow_images_per_id,
                        n_val_ids=self.n_val_ids if i == 0 else 2, val_pairs=self.val_pairs if i == 0 else 20,
                        n_test_ids=2, test_pairs=20, **self.extra_spec)
            if self.profile_prob is not None:
                spec["profile_prob"] = self.profile_prob
            specs.append(spec)
        return specs

    def pool_for(self, n_ids: int, per_id: int) -> int:
        """Index of the first labeled pool holding ``n_ids`` identities x ``per_id`` images."""
        for i, (n, k) in enumerate(self.labeled_pools):
            if n_ids <= n and per_id <= k:
                return i
        raise ValueError(f"plan {self.name}: no labeled pool holds {n_ids} x {per_id}")


PLANS = {
    "full": Plan(
        name="full", data_seed=0, image_size=32, n_val_ids=400, val_pairs=4000,
        fixed_budget=((50, 40), (100, 20), (400, 5), (1000, 2)),
        fixed_depth=((100, 5), (400, 5), (1600, 5)), width_steps=640, width_min_passes=20,
        deep=(50, 40), n_shallow_ids=2000, shallow_images_per_id=(1, 3), oracle_epochs=30,
        seeds=(0, 1, 2), labeled_pools=((100, 40), (1600, 5))),
    "smoke": Plan(
        name="smoke", data_seed=0, image_size=16, n_val_ids=20, val_pairs=40,
        fixed_budget=((4, 4), (8, 2)), fixed_depth=((4, 2), (8, 2)), width_steps=2, width_min_passes=1,
        deep=(4, 4),
        n_shallow_ids=8, shallow_images_per_id=(1, 2), oracle_epochs=1, seeds=(0, 1),
        labeled_pools=((4, 4), (8, 2)), steps_per_epoch=1, arch="mobilefacenet_s", feat_len=32,
        label_batch_size=4, unlabel_batch_size=4),
}


# ---------------------------------------------------------------------------------------- data

def build_pools(plan: Plan, cache_dir: str) -> list:
    """One SyntheticFaces per labeled pool (see :meth:`Plan.pool_specs`)."""
    from virface.data.synthetic import SyntheticSpec, load_synthetic

    return [load_synthetic(SyntheticSpec(**spec), cache_dir=cache_dir) for spec in plan.pool_specs()]


def labeled_subset(source: ArraySource, n_ids: int, per_id: int) -> ArraySource:
    """Identities 0..n_ids-1 of the pool's labeled split, the first ``per_id`` images of each."""
    keep = []
    for c in range(n_ids):
        rows = np.flatnonzero(source.labels == c)
        if len(rows) < per_id:
            raise ValueError(f"the pool has {len(rows)} images of identity {c}, not {per_id}")
        keep.append(rows[:per_id])
    return source.subset(np.concatenate(keep), f"{source.name}[{n_ids}x{per_id}]")


def oracle_data(deep: ArraySource, shallow: ArraySource, pair_sets, input_size: int) -> StageData:
    """Deep then shallow images, all with their true identities, batched like VirFace's."""
    union = ArraySource(np.concatenate([deep.images, shallow.images]),
                        np.concatenate([deep.classes[deep.labels], shallow.classes[shallow.labels]]),
                        "synthetic:deep+shallow(true ids)")
    return StageData(union, None, pair_sets, input_size, labeled_split=len(deep))


# ------------------------------------------------------------------------------------ training

def schedule(plan: Plan, n_first: int, total_steps: int) -> dict[str, Any]:
    """Epoch length, epochs and lr decay epochs giving about ``total_steps`` steps: an epoch is one
    pass over ``n_first`` images (the deep part), capped at ``plan.steps_per_epoch`` steps."""
    per_epoch = min(math.ceil(n_first / plan.label_batch_size), plan.steps_per_epoch)
    epochs = max(1, round(total_steps / per_epoch))
    return {"steps_per_epoch": per_epoch, "max_epoch": epochs, **schedule_decay(plan, epochs)}


def schedule_decay(plan: Plan, epochs: int) -> dict[str, Any]:
    """lr decay epochs at ``plan.decay_at`` fractions of ``epochs`` (none if the run is too short)."""
    decay = sorted({max(1, round(epochs * f)) for f in plan.decay_at})
    return {"decay_steps": tuple(d for d in decay if d < epochs) or (epochs + 1,)}


def train_config(plan: Plan, seed: int, sched: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        method="pretrain", arch=plan.arch, feat_len=plan.feat_len, s=plan.s, m=plan.m, lr=plan.lr,
        gamma=plan.gamma, momentum=plan.momentum, weight_decay=plan.weight_decay,
        label_batch_size=plan.label_batch_size, unlabel_batch_size=plan.unlabel_batch_size,
        eval=False, tensorboard=False, device="auto", seed=seed, loader_workers=0, **sched)


def evaluate_checkpoint(path: str, pair_sets) -> dict[str, float]:
    """10-fold verification of the backbone saved in ``path`` on each pair set."""
    from virface.backbones import build_backbone
    from virface.checkpoint import load_checkpoint, load_module_state, model_meta
    from virface.evaluation.verification import evaluate_pair_set

    state = load_checkpoint(path)
    meta = model_meta(state, path)
    backbone = build_backbone(meta["arch"], feat_len=meta["feat_len"], input_size=meta["input_size"])
    load_module_state(backbone, state["backbone"], "backbone", path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone.to(device)
    metrics: dict[str, float] = {}
    for name, pair_set in pair_sets.items():
        result = evaluate_pair_set(backbone, pair_set, device=device)
        metrics[f"{name}_acc"] = float(result.acc)
        metrics[f"{name}_acc_std"] = float(result.acc_std)
    return metrics


class Runner:
    """Trains ``pretrain`` runs into numbered folders under ``work`` and evaluates the last epoch."""

    def __init__(self, plan: Plan, work: str, log=print):
        self.plan, self.work, self.log = plan, work, log
        self._n = 0

    def run(self, tag: str, data: StageData, seed: int, sched: dict[str, Any]) -> dict[str, Any]:
        from virface.stages import run_stage

        self._n += 1
        config = train_config(self.plan, seed, sched)
        start = time.perf_counter()
        result = run_stage(config, os.path.join(self.work, f"{self._n:03d}-{tag}"), data=data,
                           keep_epoch_checkpoints=False)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        final = evaluate_checkpoint(result.last_checkpoint, data.pair_sets)
        eval_s = time.perf_counter() - start
        last = result.history[-1]
        steps = sum(h["steps"] for h in result.history)
        return {"tag": tag, "seed": seed, "final": final, "steps": steps,
                "images_per_step": plan_batch(self.plan, data),
                "final_train_loss": round(float(last["loss"]), 4),
                "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), **sched}


def plan_batch(plan: Plan, data: StageData) -> int:
    return plan.label_batch_size + (plan.unlabel_batch_size if data.labeled_split is not None else 0)


# ------------------------------------------------------------------------------------ the checks

def width_steps(plan: Plan, n_images: int) -> int:
    """Steps of a width-curve run: ``plan.width_steps``, or more where a set is so large that
    those would not pass ``plan.width_min_passes`` times over it. A run that sees each image
    only a few times measures too little compute rather than the data: at 640 steps, 1,600 x 5
    images scored below 400 x 5 (5 passes against 20); at 20 passes, well above it."""
    return max(plan.width_steps, math.ceil(plan.width_min_passes * n_images / plan.label_batch_size))


def run_width_curve(plan: Plan, runner: Runner, pools: list) -> list[dict[str, Any]]:
    rows, done = [], {}
    pair_sets = dict(pools[0].pair_sets)
    for group, shapes in (("fixed_budget", plan.fixed_budget), ("fixed_depth", plan.fixed_depth)):
        for n_ids, per_id in shapes:
            if (n_ids, per_id) not in done:
                pool = plan.pool_for(n_ids, per_id)
                source = labeled_subset(pools[pool].labeled, n_ids, per_id)
                data = StageData(source, None, pair_sets, plan.image_size)
                rec = runner.run(f"width-{n_ids}x{per_id}", data, plan.width_seed,
                                 schedule(plan, len(source), width_steps(plan, len(source))))
                rec.update(ids=n_ids, images_per_id=per_id, images=len(source), pool=pool)
                done[(n_ids, per_id)] = rec
                runner.log(f"  width {n_ids:>5} ids x {per_id:>2} = {len(source):>6} images  "
                           + _accs(rec["final"]) + f"  ({rec['train_s']:.0f} s + {rec['eval_s']:.0f} s)")
            rows.append({**done[(n_ids, per_id)], "group": group})
    return rows


def run_oracle(plan: Plan, runner: Runner, pools: list) -> list[dict[str, Any]]:
    faces = pools[0]
    deep = labeled_subset(pools[plan.pool_for(*plan.deep)].labeled, *plan.deep)
    shallow = faces.unlabeled
    arms = {"labeled_only": StageData(deep, None, dict(faces.pair_sets), plan.image_size),
            "oracle": oracle_data(deep, shallow, dict(faces.pair_sets), plan.image_size)}
    # Both arms: an epoch is one pass over the deep images (the oracle's shallow part is read
    # as far as those steps go), the same epochs and lr schedule.
    sched = {"steps_per_epoch": min(math.ceil(len(deep) / plan.label_batch_size), plan.steps_per_epoch),
             "max_epoch": plan.oracle_epochs, **schedule_decay(plan, plan.oracle_epochs)}
    rows = []
    for seed in plan.seeds:
        row: dict[str, Any] = {"seed": seed}
        for arm, data in arms.items():
            rec = runner.run(f"oracle-seed{seed}-{arm}", data, seed, sched)
            row[arm] = rec
            runner.log(f"  seed {seed} {arm:<13} " + _accs(rec["final"])
                       + f"  ({rec['train_s']:.0f} s + {rec['eval_s']:.0f} s)")
        row["gain"] = {n: 100 * (row["oracle"]["final"][f"{n}_acc"] - row["labeled_only"]["final"][f"{n}_acc"])
                       for n in PAIR_SETS}
        rows.append(row)
    return rows


def oracle_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PAIR_SETS:
        gains = np.array([r["gain"][name] for r in rows])
        base = np.array([100 * r["labeled_only"]["final"][f"{name}_acc"] for r in rows])
        orc = np.array([100 * r["oracle"]["final"][f"{name}_acc"] for r in rows])
        std = float(gains.std(ddof=1)) if len(gains) > 1 else float("nan")
        out[name] = {"labeled_only_mean": float(base.mean()), "oracle_mean": float(orc.mean()),
                     "gain_mean": float(gains.mean()), "gain_paired_std": std,
                     "gain_in_stds": float(gains.mean() / std) if std > 0 else float("inf")}
    hard = out[HARDEST]
    out["checks"] = {
        f"gain >= {MIN_GAIN_POINTS:g} points on {HARDEST}": bool(hard["gain_mean"] >= MIN_GAIN_POINTS),
        f"gain > {MIN_GAIN_IN_STDS:g} paired stds on {HARDEST}": bool(
            len(rows) >= 2 and hard["gain_mean"] > MIN_GAIN_IN_STDS * hard["gain_paired_std"]),
    }
    return out


# --------------------------------------------------------------------------------------- tables

def _accs(final: dict[str, float]) -> str:
    return " ".join(f"{n[6:]}={100 * final[n + '_acc']:.2f}" for n in PAIR_SETS)


def width_table(rows: list[dict[str, Any]], plan: Plan) -> str:
    lines = [f"Width curve: ArcFace from scratch, {plan.label_batch_size} images per step, "
             f"{plan.width_steps} steps or {plan.width_min_passes} passes over the set, whichever is "
             f"more (seed {plan.width_seed}); final-epoch 10-fold accuracy % on the validation pairs",
             "",
             "| group | identities | images / id | images | steps | synth_lfw | synth_cfp_ff | synth_cfp_fp "
             "| train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        accs = " | ".join(f"{100 * r['final'][n + '_acc']:.2f}" for n in PAIR_SETS)
        group = "fixed image budget" if r["group"] == "fixed_budget" else "fixed images / id"
        lines.append(f"| {group} | {r['ids']} | {r['images_per_id']} | {r['images']} | {r['steps']} | {accs} "
                     f"| {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def oracle_table(rows: list[dict[str, Any]], summary: dict[str, Any], plan: Plan) -> str:
    d, s = plan.deep, plan.shallow_images_per_id
    lines = [f"Oracle: {d[0]} x {d[1]} deep images, + {plan.n_shallow_ids} shallow identities "
             f"({s[0]}-{s[1]} images each) WITH their true labels, {plan.label_batch_size} deep + "
             f"{plan.unlabel_batch_size} shallow images per step, against the deep images alone "
             f"({plan.label_batch_size} per step); {rows[0]['labeled_only']['steps'] if rows else 0} "
             "steps each, same lr schedule and seed; final-epoch accuracy % on the validation pairs",
             "",
             "| seed | " + " | ".join(f"{n} labeled-only | {n} oracle | {n} gain" for n in PAIR_SETS) + " |",
             "|---:|" + "---:|" * (3 * len(PAIR_SETS))]
    for r in rows:
        cells = []
        for n in PAIR_SETS:
            cells += [f"{100 * r['labeled_only']['final'][n + '_acc']:.2f}",
                      f"{100 * r['oracle']['final'][n + '_acc']:.2f}", f"{r['gain'][n]:+.2f}"]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    cells = []
    for n in PAIR_SETS:
        st = summary[n]
        cells += [f"{st['labeled_only_mean']:.2f}", f"{st['oracle_mean']:.2f}",
                  f"{st['gain_mean']:+.2f} ± {st['gain_paired_std']:.2f}"]
    lines.append("| mean (gain ± paired std) | " + " | ".join(cells) + " |")
    lines += ["", f"Checks on {HARDEST} (the hardest validation pair set):", ""]
    hard = summary[HARDEST]
    lines.append(f"- mean gain {hard['gain_mean']:+.2f} points, paired std {hard['gain_paired_std']:.2f} "
                 f"({hard['gain_in_stds']:.1f} stds) over {len(rows)} seeds")
    for check, ok in summary["checks"].items():
        lines.append(f"- {check}: {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines) + "\n"


def settings_line(plan: Plan) -> str:
    decay = " and ".join(f"{round(100 * f)} %" for f in plan.decay_at)
    return (f"Training (every run): {plan.arch}, {plan.image_size} px, feat_len {plan.feat_len}, ArcFace "
            f"s={plan.s:g} m={plan.m:g}, SGD lr {plan.lr:g} momentum {plan.momentum:g} weight decay "
            f"{plan.weight_decay:g}, lr x{plan.gamma:g} after {decay} of the epochs, horizontal flips; "
            f"validation: {plan.n_val_ids} identities, {plan.val_pairs} pairs per set, data seed "
            f"{plan.data_seed}.")


def markdown(results: dict[str, Any]) -> str:
    """calibration.md from a results dict (what ``_run`` returns and writes as JSON)."""
    plan = plan_from_dict(results["plan"])
    parts = [f"# Data calibration (renderer v{results['data']['renderer_version']}, plan {plan.name})",
             "", settings_line(plan), ""]
    if "width" in results:
        parts.append(width_table(results["width"]["rows"], plan))
    if "oracle" in results:
        parts.append(oracle_table(results["oracle"]["rows"], results["oracle"]["summary"], plan))
    m = results["machine"]
    times = [f"data {results['data']['build_s']:.0f} s"]
    times += [f"{key} {results[key]['wall_s']:.0f} s" for key in ("width", "oracle") if key in results]
    parts.append(f"Wall time {results['wall_s']:.0f} s ({', '.join(times)}) on {m['cpus']} CPU cores, "
                 f"{m['torch_threads']} torch thread(s){', CUDA' if m['cuda'] else ''}; load average "
                 f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end. "
                 f"Command: `{results['command']}`.")
    return "\n".join(parts) + "\n"


def plan_from_dict(values: dict[str, Any]) -> Plan:
    def tuples(x):
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return Plan(**{k: (v if k == "extra_spec" else tuples(v)) for k, v in values.items()})


# ---------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny data, 1-step epochs (the test)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the plan's oracle seeds")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "calibration"),
                   help="folder for calibration.json and calibration.md")
    p.add_argument("--work", default=None,
                   help="folder for the run folders (checkpoints); default: a temporary folder, deleted")
    p.add_argument("--cache-dir", default=None,
                   help="synthetic data cache; default $VIRFACE_CACHE_DIR, else inside the work folder")
    p.add_argument("--only", choices=("width", "oracle"), default=None, help="run one of the two checks")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the benchmark's figures are for one thread)")
    p.add_argument("--from-json", default=None, metavar="CALIBRATION_JSON",
                   help="train nothing: rewrite calibration.md in --out from an earlier calibration.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "calibration.md"), "w") as f:
            f.write(markdown(results))
        print(markdown(results))
        return results
    plan = PLANS["smoke" if args.smoke else "full"]
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(args.seeds))
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="calibration-") as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        cache = args.cache_dir or os.environ.get("VIRFACE_CACHE_DIR") or os.path.join(work, "cache")
        return _run(plan, args, work, cache)


def _run(plan: Plan, args, work: str, cache: str) -> dict[str, Any]:
    from virface.data.synthetic import RENDERER_VERSION, save_preview

    start = time.perf_counter()
    load_start = os.getloadavg()
    pools = build_pools(plan, cache)
    data_s = time.perf_counter() - start
    faces = pools[0]
    pools_text = ", ".join(f"{len(p.labeled)} ({p.labeled.num_classes} ids)" for p in pools)
    print(f"[{plan.name}] renderer v{RENDERER_VERSION}: labeled pools of {pools_text} images, "
          f"{len(faces.unlabeled)} shallow images ({faces.unlabeled.num_classes} ids), "
          f"{len(faces.pair_sets)} validation pair sets x {plan.val_pairs} pairs over "
          f"{plan.n_val_ids} ids (data {data_s:.0f} s)", flush=True)
    save_preview(faces, os.path.join(args.out, "preview.png"))
    runner = Runner(plan, work)
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan), "protocol": __doc__,
                               "data": {"renderer_version": RENDERER_VERSION, "specs": plan.pool_specs(),
                                        "build_s": round(data_s, 1)}}
    if args.only in (None, "width"):
        t0 = time.perf_counter()
        rows = run_width_curve(plan, runner, pools)
        results["width"] = {"rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
        print("\n" + width_table(rows, plan), flush=True)
    if args.only in (None, "oracle"):
        t0 = time.perf_counter()
        rows = run_oracle(plan, runner, pools)
        summary = oracle_summary(rows)
        results["oracle"] = {"rows": rows, "summary": summary, "wall_s": round(time.perf_counter() - t0, 1)}
        print("\n" + oracle_table(rows, summary, plan), flush=True)
    wall = time.perf_counter() - start
    results["wall_s"] = round(wall, 1)
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "cuda": torch.cuda.is_available(), "torch": torch.__version__,
                          "python": platform.python_version(),
                          "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    results["command"] = " ".join(["python benchmarks/data_calibration.py", *(argv_of(args))])
    with open(os.path.join(args.out, "calibration.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "calibration.md"), "w") as f:
        f.write(markdown(results))
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); outputs in {args.out}")
    return results


def argv_of(args) -> list[str]:
    out = []
    if args.smoke:
        out.append("--smoke")
    if args.seeds:
        out += ["--seeds", *map(str, args.seeds)]
    if args.only:
        out += ["--only", args.only]
    return out


if __name__ == "__main__":
    main()
