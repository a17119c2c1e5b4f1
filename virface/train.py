"""``virface-train``: one stage, in one process or data-parallel on Ray Train. Mirrors the
reference's ``train.py`` arguments, with real types (``--eval/--no-eval`` rather than
``type=bool``; ``--decay_steps 8 12 15 18``).

    virface-train --method pretrain  --snapshot_prefix runs/pretrain
    virface-train --method generator --pretrained_file runs/pretrain/best.pt --snapshot_prefix runs/generator
    virface-train --method virface   --pretrained_file runs/generator/best.pt --snapshot_prefix runs/virface

    virface-train --method pretrain --workers 8 --gpus_per_worker 1 --snapshot_prefix runs/pretrain

With --workers N the stage runs as N DDP ranks on Ray Train (a local Ray with this machine's
CPUs and GPUs, or the cluster at --address), writing the same run folder; global batch sizes
are split over the ranks. With no data options it trains on the built-in synthetic faces. Every
option also has a kebab-case spelling (--label-batch-size).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from virface.checkpoint import checkpoint_run_dir, load_checkpoint, resume_config
from virface.config import METHODS, TrainConfig, config_field_names
from virface.errors import ConfigError, VirFaceError
from virface.options import HelpFormatter, add_dataclass_options, given_options, line_buffered_output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virface-train", description=__doc__,
                                     usage="%(prog)s --method STAGE [options]",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--method", choices=METHODS, required=True, help="the stage to train")
    add_dataclass_options(parser, TrainConfig, [n for n in config_field_names() if n != "method"])
    ray_train = parser.add_argument_group("data parallel on Ray Train (default: one process, no Ray)")
    ray_train.add_argument("--workers", type=int, default=1, metavar="N",
                           help="DDP ranks, placed and restarted by Ray Train (default: 1, no Ray)")
    ray_train.add_argument("--cpus_per_worker", "--cpus-per-worker", type=float, default=1.0, metavar="C",
                           help="CPUs each rank reserves (default: 1)")
    ray_train.add_argument("--gpus_per_worker", "--gpus-per-worker", type=float, default=0.0, metavar="G",
                           help="GPUs each rank reserves; > 0 trains on CUDA with nccl "
                                "(default: 0, gloo on CPU)")
    ray_train.add_argument("--address", metavar="ADDR",
                           help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray on "
                                "loopback, stopped at the end)")
    ray_train.add_argument("--max_failures", "--max-failures", type=int, default=1, metavar="K",
                           help="restarts of the ranks from the last epoch's checkpoint after one "
                                "fails (default: 1)")
    return parser


def check_data_parallel_args(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ConfigError(f"workers: {args.workers} must be >= 1")
    if args.cpus_per_worker <= 0:
        raise ConfigError(f"cpus_per_worker: {args.cpus_per_worker} must be > 0")
    if args.gpus_per_worker < 0:
        raise ConfigError(f"gpus_per_worker: {args.gpus_per_worker} must be >= 0")
    if args.max_failures < 0:
        raise ConfigError(f"max_failures: {args.max_failures} must be >= 0")
    if args.workers == 1 and (args.address or args.gpus_per_worker or args.cpus_per_worker != 1.0):
        raise ConfigError("--address, --cpus_per_worker and --gpus_per_worker place Ray Train ranks: "
                          "give --workers N (N >= 2) with them, or leave them out for one process")


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
    line_buffered_output()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        check_data_parallel_args(args)
        config = config_from_args(args)
        if args.workers > 1:
            if not (args.address or os.environ.get("RAY_ADDRESS")) and "ray" not in sys.modules:
                # As virface-search: the local Ray uses token authentication, Ray's default,
                # chosen explicitly so that Ray does not warn that it chose it.
                os.environ.setdefault("RAY_AUTH_MODE", "token")
            from virface.ray_train import train_data_parallel

            result = train_data_parallel(config, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                         gpus_per_worker=args.gpus_per_worker, address=args.address,
                                         max_failures=args.max_failures)
        else:
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
