"""Search a VirFace stage with Ray Tune + Optuna, running its missing upstream stages first.

    python tune/run_search.py --stage virface                 # the default chain, synthetic faces
    python tune/run_search.py --stage virclass --labeled /data/ms1m_subset --unlabeled /data/shallow \
        --val lfw=/data/lfw.bin --val cfp_fp=/data/cfp_fp.bin --workers 4 --gpus-per-worker 1
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python tune/run_search.py --stage virface --storage /shared/experiments
    tensorboard --logdir experiments/default
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from virface.config import METHODS  # noqa: E402
from virface.errors import VirFaceError  # noqa: E402
from virface.train import add_data_arguments, data_options  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=METHODS, default="virface",
                   help="the stage to search; missing upstream stages are searched first")
    p.add_argument("--space", help="search-space YAML for --stage (default search_spaces/<stage>.yaml)")
    p.add_argument("--storage", default="experiments",
                   help="experiment storage (made absolute); on a cluster, storage every node shares")
    p.add_argument("--name", default="default", help="experiment name: <storage>/<name>/")
    p.add_argument("--arch", help="backbone of the pretrain stage (overrides its YAML)")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks) per trial")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--num-samples", type=int, help="trials per stage (overrides the YAML)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (overrides the YAML)")
    p.add_argument("--max-failures", type=int, default=1, help="retries of an errored trial")
    p.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    p.add_argument("--from-checkpoint", help="start --stage from this checkpoint instead of its upstream search")
    p.add_argument("--budget", choices=("default", "smoke"), default="default",
                   help="smoke: 1 trial x 1 epoch x 3 steps per stage on tiny data (for tests)")
    p.add_argument("--plots", action="store_true", help="write Optuna's history/importance plots per stage")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    add_data_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from virface.search.runner import SearchOptions, run_search

    options = SearchOptions(
        stage=args.stage, storage=args.storage, name=args.name, space=args.space, data=data_options(args),
        arch=args.arch, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, num_samples=args.num_samples,
        max_concurrent=args.max_concurrent, address=args.address, resume=args.resume,
        from_checkpoint=args.from_checkpoint, budget=args.budget, plots=args.plots,
        max_failures=args.max_failures, verbose=not args.quiet)
    try:
        outcomes = run_search(options)
    except VirFaceError as exc:
        print(f"run_search: error: {exc}", file=sys.stderr)
        return 2
    from virface.search.runner import format_table, stage_space

    print("\n" + "\n\n".join(format_table(o, stage_space(options, o.stage).metric_name) for o in outcomes))
    experiment = os.path.join(options.storage, options.name)
    print(f"\nTensorBoard: tensorboard --logdir {experiment}")
    failed = [o for o in outcomes if o.manifest is None]
    if failed:
        print(f"run_search: {failed[0].error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
