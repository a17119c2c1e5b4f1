"""The instance diagnostics of trained generators, and of covariance transfer on their backbones,
on the data their checkpoints were trained on (issue 18, part 1; the figures for a comparison
of variants).

    python benchmarks/instance_diagnostics.py runs/generator/best.pt [more.pt ...] \
        [--covariance 0 16] [--cov_scale 1.0 0.5] [--cov_shrink 0 0.5 1] [--json out.json]
    python benchmarks/instance_diagnostics.py --plot instances.png --from-json a.json b.json

For each checkpoint: its generator's figures (virface.instance_diagnostics: draw cos against the
real same-identity cos, identity keep, nearest-W pull, own-class share) on the validation pair
sets' same-identity pairs, and with ``--covariance R ...`` covariance transfer of rank R (0:
full) on the same backbone, for every --cov_scale and --cov_shrink given. Prints one line each; the gate's warning where identity keep < 0.
Nothing is trained. On the built-in faces each checkpoint takes seconds on CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from virface.checkpoint import load_checkpoint  # noqa: E402
from virface.config import TrainConfig  # noqa: E402
from virface.data.loading import build_stage_data  # noqa: E402
from virface.instance_diagnostics import generator_gate  # noqa: E402
from virface.metrics import format_instance_metrics  # noqa: E402


def checkpoint_data(path: str):
    """The labeled data and pair sets ``path``'s run was trained and validated on."""
    state = load_checkpoint(path)
    config = TrainConfig.from_dict({**state["config"], "method": "generator", "pretrained_file": None,
                                    "resume_file": None})
    return build_stage_data(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="generator- or virface-stage checkpoints")
    parser.add_argument("--from-json", nargs="+", default=[], metavar="JSON",
                        help="measure nothing: plot the figures these --json files hold")
    parser.add_argument("--plot", metavar="PNG",
                        help="draw spread against identity keep, one point per checkpoint and sampler")
    parser.add_argument("--covariance", type=int, nargs="*", default=[], metavar="RANK",
                        help="also measure covariance transfer of these ranks (0: full)")
    parser.add_argument("--cov_scale", type=float, nargs="+", default=[1.0])
    parser.add_argument("--cov_shrink", type=float, nargs="+", default=[0.0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    results = [r for path in args.from_json for r in json.load(open(path, encoding="utf-8"))]
    if not args.checkpoints and not results:
        parser.error("give checkpoints to measure, or --from-json files to plot")
    for path in args.checkpoints:
        data = checkpoint_data(path)
        variants = [("generator", {})] + [
            (f"covariance rank {r or 'full'} scale {scale:g} shrink {shrink:g}",
             {"vi_generator": "covariance", "cov_rank": r, "cov_scale": scale, "cov_shrink": shrink})
            for r in args.covariance for scale in args.cov_scale for shrink in args.cov_shrink]
        for name, changes in variants:
            figures = generator_gate(path, data, go_on=True, device=args.device, **changes)
            results.append({"checkpoint": path, "instances": name, **figures})
            print(f"{path} [{name}]: {format_instance_metrics(figures)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot(results: list[dict], path: str) -> None:
    """x: cosine between two draws from one source (spread; lower is more varied), y: identity
    keep; the real same-identity cosine as a band, the keep = 0 line the gate's bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    names = list(dict.fromkeys(r["instances"] for r in results))
    for i, name in enumerate(names):
        rows = [r for r in results if r["instances"] == name]
        ax.scatter([r["vi_draw_cos"] for r in rows], [r["vi_identity_keep"] for r in rows], s=22,
                   color=f"C{i % 10}", marker="o" if name == "generator" else "s^vD<>"[i % 6], label=name)
    real = [r["vi_real_cos"] for r in results]
    ax.axvspan(min(real), max(real), color="0.85", zorder=0, label="real same-identity cos (range)")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("draw cos: cosine between two instances of one source")
    ax.set_ylabel("identity keep: cos(G(f_a), f_b) - cos(f_a, f_b)")
    ax.set_title("What the samplers draw, on held-out same-identity pairs (above 0: keeps identity)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
