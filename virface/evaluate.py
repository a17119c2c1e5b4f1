"""``virface-eval``: score checkpoints on verification pair sets, without training.

    virface-eval runs/virclass/best.pt --val cfp_fp=/data/cfp_fp.bin --test lfw=/data/lfw.bin
    virface-eval runs/virclass/best.pt runs/baseline/best.pt --json eval.json

One checkpoint: each pair set's accuracy with its standard error over pairs, the 10-fold std and
TAR@FAR=1e-3, by the insightface 10-fold protocol, exactly as training reports them. Two
checkpoints (A, B) of the same backbone: also A - B on the same pairs, in points, with a 95%
interval and the exact McNemar p-value (each pair right or wrong at its fold's threshold; only
the pairs one model gets right and the other wrong tell them apart).

With no --val and no --test: the built-in synthetic faces' pair sets, from the synthetic spec the
first checkpoint trained on (or --synthetic). Test pair sets are named test_<NAME>, as in
metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from virface.config import TEST_PREFIX, TrainConfig
from virface.errors import CheckpointError, ConfigError, VirFaceError
from virface.evaluation.pairs import PairSet
from virface.options import HelpFormatter, add_dataclass_options, given_options, line_buffered_output

# The data and run options of virface-train that scoring uses.
OPTIONS = ("val", "test", "input_size", "synthetic", "device")
METHOD = ("paired over the same pairs: each pair right or wrong at its fold's threshold; "
          "A - B in points with its SE and Wald 95% CI from the per-pair differences; "
          "p: exact McNemar (two-sided binomial test on the discordant pairs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virface-eval", description=__doc__,
                                     usage="%(prog)s CKPT [CKPT2] [--val NAME=PATH ...] "
                                           "[--test NAME=PATH ...] [options]",
                                     formatter_class=HelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="one checkpoint to score, or two to compare (A - B)")
    add_dataclass_options(parser, TrainConfig, OPTIONS)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=256, metavar="N",
                        help="images per forward pass (default: 256, as training evaluates)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON (a new file; never overwritten)")
    return parser


@dataclass
class Scored:
    """One pair set, scored by every checkpoint."""

    key: str                 # the metric stem: NAME for --val sets, test_NAME for --test sets
    role: str                # "val" | "test"
    source: str              # the file, or "built-in synthetic"
    n_pairs: int
    results: list            # VerificationResult per checkpoint
    pairs_per_s: list[float]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The pair-set options given, validated as virface-train validates them."""
    return TrainConfig.from_dict(given_options(args, OPTIONS), where="virface-eval options")


def load_models(paths: list[str], device) -> tuple[list, list[dict[str, Any]]]:
    """The backbones of ``paths`` and their checkpoints; two checkpoints must describe the same
    backbone (arch, embedding size, input size), or their scores are not on one footing."""
    from virface import storage
    from virface.checkpoint import load_backbone, model_meta

    for path in paths:              # both named before either is read (a read takes a while)
        if not storage.is_file(path):       # a file, or an object of a storage URI
            raise CheckpointError(f"checkpoint not found: {path}")
    backbones, states = [], []
    for path in paths:
        backbone, state = load_backbone(path, device)
        backbones.append(backbone)
        states.append(state)
    if len(paths) == 2:
        a, b = (model_meta(s, p) for s, p in zip(states, paths))
        differ = [k for k in ("arch", "feat_len", "input_size") if a.get(k) != b.get(k)]
        if differ:
            raise CheckpointError(
                f"{paths[1]} is another backbone than {paths[0]}: "
                + ", ".join(f"{k} {b.get(k)!r} vs {a.get(k)!r}" for k in differ)
                + "; a paired comparison scores the same backbone on the same pairs")
    return backbones, states


def synthetic_spec(given: dict[str, Any] | None, states: list[dict[str, Any]],
                   paths: list[str]) -> dict[str, Any]:
    """The synthetic spec overrides to render pair sets with: ``--synthetic``, else the one the
    checkpoints trained on (two checkpoints trained on different ones need --synthetic)."""
    if given:
        return dict(given)
    specs = [dict((s.get("config") or {}).get("synthetic") or {}) for s in states]
    if len(specs) == 2 and specs[0] != specs[1]:
        raise ConfigError(f"synthetic: {paths[0]} trained on synthetic faces {specs[0]} but "
                          f"{paths[1]} on {specs[1]}; give --synthetic KEY=VALUE (or --val/--test)")
    return specs[0]


def open_pair_sets(config: TrainConfig, input_size: int, states: list[dict[str, Any]],
                   paths: list[str], say) -> list[tuple[str, str, str, PairSet]]:
    """``(key, role, source, pair set)`` for every set to score, resized to ``input_size``."""
    from virface.data.images import resize_square
    from virface.evaluation.verification import open_pair_set

    sets: list[tuple[str, str, str, PairSet]] = []
    if config.val or config.test:
        for role, given in (("val", config.val), ("test", config.test)):
            prefix = TEST_PREFIX if role == "test" else ""
            for name, path in given.items():
                sets.append((prefix + name, role, path, open_pair_set(name, path, image_size=input_size)))
    else:
        from virface.data.loading import synthetic_cache_dir
        from virface.data.synthetic import SyntheticSpec, load_synthetic

        overrides = synthetic_spec(config.synthetic, states, paths)
        say(f"no --val or --test given: scoring the built-in synthetic faces' pair sets "
            f"(spec overrides {overrides or 'none'})")
        faces = load_synthetic(SyntheticSpec.from_dict(overrides, where="synthetic"),
                               cache_dir=synthetic_cache_dir())
        for role, given in (("val", faces.pair_sets), ("test", faces.test_pair_sets)):
            prefix = TEST_PREFIX if role == "test" else ""
            sets += [(prefix + name, role, "built-in synthetic", ps) for name, ps in given.items()]
    resized = []
    for key, role, source, ps in sets:
        if ps.images.shape[-1] != input_size or ps.images.shape[-2] != input_size:
            ps = PairSet(ps.name, resize_square(ps.images, input_size), ps.issame)
        resized.append((key, role, source, ps))
    return resized


def score(backbones: list, pair_sets: list[tuple[str, str, str, PairSet]], device,
          batch_size: int, say) -> list[Scored]:
    from virface.evaluation.verification import evaluate_pair_set

    scored = []
    for key, role, source, ps in pair_sets:
        results, rates = [], []
        for label, backbone in zip("AB", backbones):
            start = time.perf_counter()
            results.append(evaluate_pair_set(backbone, ps, device=device, batch_size=batch_size))
            rates.append(len(ps) / max(time.perf_counter() - start, 1e-9))
            which = f" {label}" if len(backbones) > 1 else ""
            say(f"[{key}]{which}: {len(ps)} pairs, {rates[-1]:.0f} pairs/s")
        scored.append(Scored(key, role, source, len(ps), results, rates))
    return scored


def summary(paths: list[str], states: list[dict[str, Any]], scored: list[Scored],
            device: str) -> dict[str, Any]:
    """What virface-eval prints and writes to --json: accuracies as fractions, differences and
    their intervals in points."""
    from virface.stats import paired_over_pairs

    out: dict[str, Any] = {
        "checkpoints": [{"path": os.path.abspath(p), "stage": s.get("stage"), "epoch": s.get("epoch"),
                         "model": s.get("model")} for p, s in zip(paths, states)],
        "device": device, "pair_sets": {}}
    if len(paths) == 2:
        out["difference"] = "A - B, " + METHOD
    for s in scored:
        entry: dict[str, Any] = {
            "role": s.role, "source": s.source, "n_pairs": s.n_pairs,
            "models": [{"acc": r.acc, "acc_se": r.acc_se, "acc_std": r.acc_std,
                        "tar_far1e-3": r.tar_at_far, "far": r.far, "pairs_per_s": rate}
                       for r, rate in zip(s.results, s.pairs_per_s)]}
        if len(s.results) == 2:
            entry["difference"] = paired_over_pairs(s.results[0].correct, s.results[1].correct)
        out["pair_sets"][s.key] = entry
    return out


def format_report(result: dict[str, Any]) -> str:
    ckpts = result["checkpoints"]
    labels = "AB" if len(ckpts) == 2 else " "
    lines = [f"{label.strip() or 'checkpoint'}: {c['path']} ({c['stage']}, epoch {c['epoch']}, "
             f"{(c['model'] or {}).get('arch')})" for label, c in zip(labels, ckpts)]
    lines += ["", "accuracy in points ± its standard error over pairs; 10-fold std; TAR at FAR=1e-3",
              f"{'pair set':<20} {'role':<4} {'pairs':>6} " + ("model " if len(ckpts) == 2 else "")
              + f"{'acc ± SE':>15} {'10-fold std':>11} {'TAR@FAR=1e-3':>12}"]
    for key, entry in result["pair_sets"].items():
        for label, m in zip(labels, entry["models"]):
            model = f"{label:<5} " if len(ckpts) == 2 else ""
            lines.append(f"{key:<20} {entry['role']:<4} {entry['n_pairs']:>6} {model}"
                         f"{100 * m['acc']:>7.2f} ± {100 * m['acc_se']:<5.2f} "
                         f"{100 * m['acc_std']:>11.2f} {m['tar_far1e-3']:>12.4f}")
    if len(ckpts) == 2:
        lines += ["", f"A - B: {METHOD}",
                  f"{'pair set':<20} {'A - B':>7} {'SE':>5} {'95% CI':>17} {'p':>8} "
                  f"{'A only':>7} {'B only':>7}"]
        for key, entry in result["pair_sets"].items():
            d = entry["difference"]
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
            lines.append(f"{key:<20} {d['diff']:>+7.2f} {d['se']:>5.2f} {ci:>17} "
                         f"{d['p_value']:>8.3g} {d['n_a_only']:>7} {d['n_b_only']:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    line_buffered_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.checkpoints) > 2:
        parser.error(f"one checkpoint to score or two to compare, got {len(args.checkpoints)}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        if args.json and os.path.exists(args.json):
            raise ConfigError(f"json: {args.json} exists; give a new path (results are never "
                              f"overwritten)")
        config = config_from_args(args)
        from virface.distributed import resolve_device

        device = resolve_device(config.device)
        backbones, states = load_models(args.checkpoints, device)
        input_size = int(states[0]["model"]["input_size"])
        if config.input_size is not None and config.input_size != input_size:
            raise ConfigError(f"input_size: {config.input_size} was given, but {args.checkpoints[0]} "
                              f"was trained at {input_size}; pair sets are scored at the "
                              f"checkpoint's input size (leave --input_size out)")
        pair_sets = open_pair_sets(config, input_size, states, args.checkpoints, say)
        scored = score(backbones, pair_sets, device, args.batch_size, say)
        result = summary(args.checkpoints, states, scored, str(device))
        if args.json:
            from virface.fileio import write_text_atomic

            write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    except VirFaceError as exc:
        print(f"virface-eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
