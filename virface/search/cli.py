"""``virface-search`` (and ``python tune/run_search.py``): search a VirFace stage with Ray Tune +
Optuna, running its missing upstream stages first.

    virface-search --stage virface                 # the default chain, on the built-in synthetic faces
    virface-search --stage virclass --labeled /data/ms1m_subset --unlabeled /data/shallow/meta.txt \\
        --val lfw=/data/lfw.bin --val cfp_fp=/data/cfp_fp.bin --workers 4 --gpus_per_worker 1
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python tune/run_search.py --stage virface --storage /shared/experiments
    tensorboard --logdir experiments/default

Every option also has a kebab-case spelling (--num-samples). Running a finished search again
prints its results; --resume continues an interrupted one.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from virface.config import GROUP_DATA, TrainConfig, config_field_names
from virface.errors import VirFaceError
from virface.options import HelpFormatter, add_dataclass_options, given_options, line_buffered_output
from virface.storage import join as storages_join


def build_parser(prog: str = "virface-search") -> argparse.ArgumentParser:
    from virface.search.runner import SearchOptions

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter,
                                     usage="%(prog)s [--stage STAGE] [options]")
    groups: dict = {}
    shown = groups.setdefault("what is there (prints and exits)", parser.add_argument_group(
        "what is there (prints and exits)"))
    shown.add_argument("--spaces", action="store_true", default=argparse.SUPPRESS,
                       help="list the shipped search spaces (names for --space) with their files, and exit "
                            "(default: search)")
    shown.add_argument("--list", action="store_true", default=argparse.SUPPRESS,
                       help="list the experiments under --storage: their stages, status (finished, "
                            "running with its driver, interrupted with the command that resumes it), "
                            "best values and test figures, and exit (default: search)")
    add_dataclass_options(parser, SearchOptions, groups=groups)
    add_dataclass_options(parser, TrainConfig, config_field_names(GROUP_DATA), groups=groups)
    return parser


def options_from_args(args: argparse.Namespace, resume_command: str | None = None):
    from virface.search.runner import SearchOptions

    names = [f.name for f in dataclasses.fields(SearchOptions) if "help" in f.metadata]
    return SearchOptions(**given_options(args, names),
                         data=given_options(args, config_field_names(GROUP_DATA)),
                         resume_command=resume_command)


def resume_command(prog: str, argv: list[str]) -> str:
    """The command that continues this search: the one given, with ``--resume``."""
    if prog == "virface-search":
        words = [prog]
    else:       # run_search.py from a checkout
        script = sys.argv[0] if sys.argv[0].endswith("run_search.py") else os.path.join("tune", "run_search.py")
        words = ["python", script]
    words += [w for w in argv]
    if "--resume" not in argv:
        words.append("--resume")
    return shlex.join(words)


def format_spaces() -> str:
    """One line per shipped search space: its name (what --space takes), its stage-default mark
    and its file."""
    from virface.config import METHODS
    from virface.search.space import shipped_spaces

    spaces = shipped_spaces()
    width = max((len(n) for n in spaces), default=0)
    lines = [f"{name:<{width}}  {path}" + (f"  (the default of --stage {name})" if name in METHODS else "")
             for name, path in spaces.items()]
    return "\n".join(["shipped search spaces (--space NAME):", *lines])


def main(argv: list[str] | None = None, prog: str = "virface-search") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    line_buffered_output()
    args = build_parser(prog).parse_args(argv)
    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")) and "ray" not in sys.modules:
        # The local Ray the search starts uses token authentication, Ray's default; choosing it
        # explicitly is what keeps Ray from printing a warning that it chose it. Ray reads the
        # setting once, when imported: in a process that imported Ray already, leave it to Ray.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from virface.search.runner import run_search

    from virface.search.runner import SearchInterrupted

    if getattr(args, "spaces", False):
        print(format_spaces())
        return 0
    try:
        options = options_from_args(args, resume_command(prog, argv))
        if getattr(args, "list", False):
            from virface.search.experiments import format_experiments, list_experiments

            print(format_experiments(options.shown_storage, list_experiments(options.storage, options.storage_uri)))
            return 0
        if options.compare:
            from virface.search.compare import comparison_table, run_comparison

            print("\n" + comparison_table(run_comparison(options)))
            print(f"\nfiles: {options.storage}/{options.name}/comparison/")
            return 0
        outcomes = run_search(options)
    except (SearchInterrupted, KeyboardInterrupt) as exc:
        print(f"{prog}: interrupted: {exc or 'continue with ' + resume_command(prog, argv)}",
              file=sys.stderr)
        return 130
    except VirFaceError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print("\n" + "\n\n".join(o.table() for o in outcomes))
    if options.storage_uri:
        print(f"\nfiles: {storages_join(options.shown_storage, options.name)} (the driver's records, and "
              f"the TensorBoard runs of trials on this machine: {os.path.join(options.storage, options.name)})")
        print(f"TensorBoard: tensorboard --logdir {os.path.join(options.storage, options.name)}")
    else:
        print(f"\nTensorBoard: tensorboard --logdir {options.storage}/{options.name}")
    failed = [o for o in outcomes if o.manifest is None]
    if failed:
        print(f"{prog}: {failed[0].error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
