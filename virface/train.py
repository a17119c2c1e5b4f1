"""``virface-train``: one stage, one process. Mirrors the reference's ``train.py`` arguments,
with real types (``--eval/--no-eval`` rather than ``type=bool``; ``--decay_steps 8 12 15 18``).

    virface-train --method pretrain  --snapshot_prefix runs/pretrain
    virface-train --method generator --pretrained_file runs/pretrain/best.pt --snapshot_prefix runs/generator
    virface-train --method virface   --pretrained_file runs/generator/best.pt --snapshot_prefix runs/virface

With no data options it trains on the built-in synthetic faces.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from virface.config import AMP_MODES, METHODS, OPTIM_MODES, TrainConfig
from virface.errors import VirFaceError


def parse_key_value(text: str, what: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{what} must look like NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _yaml_scalar(text: str):
    import yaml

    return yaml.safe_load(text)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options, shared with ``tune/run_search.py``."""
    g = parser.add_argument_group("data (none given: the built-in synthetic faces)")
    g.add_argument("--labeled", metavar="PATH", help="train.rec (or its folder), an image folder, or a meta list")
    g.add_argument("--labeled-root", "--labeled_root", dest="labeled_root", metavar="DIR",
                   help="root of a meta list's relative paths (default: the list's folder)")
    g.add_argument("--unlabeled", metavar="PATH", help="unlabeled shallow data, same forms; labels ignored")
    g.add_argument("--unlabeled-root", "--unlabeled_root", dest="unlabeled_root", metavar="DIR")
    g.add_argument("--val", action="append", default=[], metavar="NAME=PATH",
                   type=lambda t: parse_key_value(t, "--val"),
                   help="a verification set: a .bin pack, an LFW folder (pairs.txt), or a CFP folder "
                        "(name ending in _ff/_fp); repeatable")
    g.add_argument("--input-size", "--input_size", dest="input_size", type=int,
                   help="side of the square input, divisible by 16 (default 112; synthetic: its size)")
    g.add_argument("--synthetic", action="append", default=[], metavar="KEY=VALUE",
                   type=lambda t: parse_key_value(t, "--synthetic"),
                   help="override a field of the synthetic data spec, e.g. n_labeled_ids=100")
    g.add_argument("--strict-data", "--strict_data", dest="strict_data", action="store_true",
                   help="raise on a corrupt image instead of skipping and counting it")
    g.add_argument("--loader-workers", "--loader_workers", dest="loader_workers", type=int, default=2)


def data_options(args: argparse.Namespace) -> dict:
    return {
        "labeled": args.labeled, "labeled_root": args.labeled_root,
        "unlabeled": args.unlabeled, "unlabeled_root": args.unlabeled_root,
        "val": dict(args.val), "input_size": args.input_size,
        "synthetic": {k: _yaml_scalar(v) for k, v in args.synthetic},
        "strict_data": args.strict_data, "loader_workers": args.loader_workers,
    }


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="virface-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True)
    m = p.add_argument_group("model")
    m.add_argument("--arch", help="a registered backbone (resnet18..152, iresnet18..100, mobilefacenet, "
                                  "mobilefacenet_s) or module.path:callable; default resnet50, "
                                  "mobilefacenet_s on synthetic data")
    m.add_argument("--feat_len", type=int)
    m.add_argument("--num_ids", type=int, help="checked against the labeled data's identity count")
    l = p.add_argument_group("losses")
    l.add_argument("--s", type=float, default=d.s)
    l.add_argument("--m", type=float, default=d.m)
    l.add_argument("--dropout", type=float, default=d.dropout)
    l.add_argument("--gen_num", type=int, default=d.gen_num)
    l.add_argument("--KL", type=float, default=d.KL)
    l.add_argument("--L2", type=float, default=d.L2)
    l.add_argument("--overlap_threshold", type=float, default=None,
                   help="drop unlabeled samples whose max softmax over labeled classes is >= this (off)")
    l.add_argument("--optim_mode", choices=OPTIM_MODES, default=d.optim_mode)
    o = p.add_argument_group("optimisation")
    o.add_argument("--label_batch_size", type=int, default=d.label_batch_size)
    o.add_argument("--unlabel_batch_size", type=int, default=d.unlabel_batch_size)
    o.add_argument("--steps_per_epoch", type=int, help="cap on steps per epoch")
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--g_lr", type=float, help="generator lr (default: --lr)")
    o.add_argument("--momentum", type=float, default=d.momentum)
    o.add_argument("--weight_decay", type=float, default=d.weight_decay)
    o.add_argument("--decay_steps", type=int, nargs="+", default=list(d.decay_steps), metavar="EPOCH")
    o.add_argument("--gamma", type=float, default=d.gamma)
    o.add_argument("--max_epoch", type=int, default=d.max_epoch)
    o.add_argument("--amp", choices=AMP_MODES, default=d.amp, help="autocast on CUDA")
    r = p.add_argument_group("run")
    r.add_argument("--snapshot_prefix", help="run folder (default runs/<method>); never overwritten")
    r.add_argument("--resume_file", help="a checkpoint of this stage: restores everything")
    r.add_argument("--pretrained_file", "--pretrain_file", dest="pretrained_file",
                   help="an upstream checkpoint: loads the models only")
    r.add_argument("--best_metric", help="metric that picks best.pt (default: hardest val accuracy)")
    r.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--seed", type=int, default=d.seed)
    add_data_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: getattr(args, k) for k in (
        "method", "arch", "feat_len", "num_ids", "s", "m", "dropout", "gen_num", "KL", "L2",
        "overlap_threshold", "optim_mode", "label_batch_size", "unlabel_batch_size", "steps_per_epoch",
        "lr", "g_lr", "momentum", "weight_decay", "decay_steps", "gamma", "max_epoch", "amp",
        "snapshot_prefix", "resume_file", "pretrained_file", "best_metric", "tensorboard", "eval",
        "device", "seed")}
    values.update(data_options(args))
    if values["resume_file"] and not values["snapshot_prefix"]:
        # Resuming continues in the run folder the checkpoint came from.
        folder = os.path.dirname(os.path.abspath(values["resume_file"]))
        values["snapshot_prefix"] = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    values["snapshot_prefix"] = values["snapshot_prefix"] or os.path.join("runs", values["method"])
    return TrainConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
        from virface.stages import run_stage

        result = run_stage(config, config.snapshot_prefix)
    except VirFaceError as exc:
        print(f"virface-train: error: {exc}", file=sys.stderr)
        return 2
    best = result.best
    print(f"done: {len(result.history)} epoch(s) in {result.run_dir}")
    if best:
        print(f"best {best['metric']}={best['value']:.4f} at epoch {best['epoch']}: {result.best_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
