"""``virface-train``: one stage, one process. Mirrors the reference's ``train.py`` arguments,
with real types (``--eval/--no-eval`` rather than ``type=bool``; ``--decay_steps 8 12 15 18``).

    virface-train --method pretrain  --snapshot_prefix runs/pretrain
    virface-train --method generator --pretrained_file runs/pretrain/best.pt --snapshot_prefix runs/generator
    virface-train --method virface   --pretrained_file runs/generator/best.pt --snapshot_prefix runs/virface

With no data options it trains on the built-in synthetic faces. Every option also has a
kebab-case spelling (--label-batch-size).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from virface.checkpoint import checkpoint_run_dir, load_checkpoint, resume_config
from virface.config import METHODS, TrainConfig, config_field_names
from virface.errors import ConfigError, VirFaceError
from virface.options import HelpFormatter, add_dataclass_options, given_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virface-train", description=__doc__,
                                     usage="%(prog)s --method STAGE [options]",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--method", choices=METHODS, required=True, help="the stage to train")
    add_dataclass_options(parser, TrainConfig, [n for n in config_field_names() if n != "method"])
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the given options. A resume takes the checkpoint's settings (options
    given may change only what is safe to change) and continues in the run folder the checkpoint
    is in now: another --snapshot_prefix is an error (a checkpoint outside a run folder needs one,
    a new folder)."""
    values = given_options(args, config_field_names())
    if values.get("resume_file"):
        state = load_checkpoint(values["resume_file"])
        if state.get("stage") != values["method"]:
            raise ConfigError(f"method: {values['method']!r}, but {values['resume_file']} is a "
                              f"{state.get('stage')} checkpoint")
        # The run folder the checkpoint is in now (a copied or moved folder resumes in place).
        own = checkpoint_run_dir(values["resume_file"])
        given_folder = values.get("snapshot_prefix")
        if own is None and not given_folder:
            raise ConfigError(f"resume_file: {values['resume_file']} is not in a run folder (not "
                              f"<run>/checkpoints/epoch_NNN.pt, nor the best.pt beside a run's "
                              f"config.json); give --snapshot_prefix: the new folder to continue in")
        if own is not None and given_folder and os.path.abspath(given_folder) != os.path.abspath(own):
            raise ConfigError(f"snapshot_prefix: {given_folder} is not the run folder of "
                              f"{values['resume_file']} ({own}); a resumed run writes only into "
                              f"its own folder (leave --snapshot_prefix out)")
        values["snapshot_prefix"] = own or given_folder
        return resume_config(state, values["resume_file"], values)
    values.setdefault("snapshot_prefix", os.path.join("runs", values["method"]))
    return TrainConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
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
