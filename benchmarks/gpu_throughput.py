"""GPU training throughput of iresnet50 at 112x112, batch 128, on synthetic tensors.

For the pretrain step (ArcFace) and the virface step (VirClass head + VirInstance + generator;
64 labeled + 64 unlabeled images, gen_num 5, alternating optimisers), in four configurations:
fp32; bf16 autocast; bf16 + channels_last; bf16 + channels_last + torch.compile. Prints
images/s and peak GPU memory of each. The steps are the library's own (``StageStep``), so what is
measured is what trains.

    python benchmarks/gpu_throughput.py                 # on a CUDA machine, a few minutes
    python benchmarks/gpu_throughput.py --cpu-smoke     # tiny shapes on CPU, to check it runs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from virface.config import TrainConfig  # noqa: E402
from virface.distributed import DistributedContext  # noqa: E402
from virface.models import build_models, build_optimizers  # noqa: E402
from virface.steps import StageStep  # noqa: E402

CONFIGS = [  # (name, amp, channels_last, compile)
    ("fp32", "none", False, False),
    ("bf16", "bf16", False, False),
    ("bf16+channels_last", "bf16", True, False),
    ("bf16+channels_last+compile", "bf16", True, True),
]


def measure(method: str, amp: str, channels_last: bool, compile_: bool, device: torch.device,
            arch: str, size: int, batch: int, num_ids: int, warmup: int, steps: int,
            sample_rate: float | None = None) -> dict:
    n_unlabeled = batch // 2 if method == "virface" else 0
    config = TrainConfig(method=method, arch=arch, feat_len=512, input_size=size, num_ids=num_ids,
                         label_batch_size=batch - n_unlabeled, unlabel_batch_size=n_unlabeled or 1,
                         gen_num=5, amp=amp, lr=0.01)
    torch.manual_seed(0)
    config = config.replace(channels_last=channels_last, compile=compile_, sample_rate=sample_rate)
    models = build_models(config)
    for module in models.modules():
        module.to(device)
    if channels_last and device.type == "cuda":
        models.backbone.to(memory_format=torch.channels_last)
    backbone = torch.compile(models.backbone) if compile_ else models.backbone
    scaler = None
    step = StageStep(config, models, backbone, build_optimizers(config, models),
                     DistributedContext(device), scaler)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_ids, (batch,), device=device)
    labels[batch - n_unlabeled:] = -1
    for _ in range(warmup):
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        terms = step(images, labels)
    float(terms["loss"].detach())                     # waits for the last step
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_s": steps * batch / elapsed, "peak_mem_gib": peak}


# The suite (issue 11's table): (label, method, amp, channels_last, compile, batch, identities
# [, Partial FC sample rate]).
SUITE = [
    ("batch 128 fp32", "pretrain", "none", False, False, 128, 10_000),
    ("batch 128 bf16", "pretrain", "bf16", False, False, 128, 10_000),
    ("batch 128 bf16+channels_last", "pretrain", "bf16", True, False, 128, 10_000),
    ("batch 128 bf16+channels_last+compile", "pretrain", "bf16", True, True, 128, 10_000),
    ("batch 256 bf16+channels_last", "pretrain", "bf16", True, False, 256, 10_000),
    ("batch 512 bf16+channels_last", "pretrain", "bf16", True, False, 512, 10_000),
    ("batch 256, 100k ids, full softmax", "pretrain", "bf16", True, False, 256, 100_000),
    ("batch 256, 1M ids, full softmax", "pretrain", "bf16", True, False, 256, 1_000_000),
    ("batch 256, 2M ids, full softmax", "pretrain", "bf16", True, False, 256, 2_000_000),
    ("batch 256, 10k ids, sample_rate 0.1", "pretrain", "bf16", True, False, 256, 10_000, 0.1),
    ("batch 256, 1M ids, sample_rate 0.1", "pretrain", "bf16", True, False, 256, 1_000_000, 0.1),
    ("batch 256, 2M ids, sample_rate 0.1", "pretrain", "bf16", True, False, 256, 2_000_000, 0.1),
    ("virface batch 256 (128+128), 100k ids", "virface", "bf16", True, False, 256, 100_000),
    ("virface batch 256 (128+128), 2M ids, sample_rate 0.1", "virface", "bf16", True, False, 256,
     2_000_000, 0.1),
]


def run_rows(rows, device, size: int, arch: str, warmup: int, steps: int, shrink=None) -> dict:
    results = {}
    for label, method, amp, channels_last, compile_, batch, num_ids, *rate in rows:
        if shrink is not None:
            batch, num_ids = shrink(batch, num_ids)
        try:
            r = measure(method, amp, channels_last, compile_, device, arch, size, batch, num_ids,
                        warmup + (5 if compile_ else 0), steps, rate[0] if rate else None)
        except torch.cuda.OutOfMemoryError as exc:      # a row too big for the card is a result too
            r = {"images_per_s": float("nan"), "peak_mem_gib": float("nan"), "error": f"out of memory: {exc}"[:200]}
            torch.cuda.empty_cache()
        results[label] = r
        print(f"  {label:<40} {r['images_per_s']:9.1f} images/s   peak {r['peak_mem_gib']:.2f} GiB", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU; torch.compile skipped")
    p.add_argument("--suite", action="store_true", help="the issue-11 table (batches, identities) instead of "
                                                       "the four configurations of both steps")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-ids", type=int, default=10000, help="classes of the ArcFace head")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, size, warmup, steps, arch = torch.device("cpu"), 16, 1, 1, "mobilefacenet_s"
        args.num_ids = min(args.num_ids, 64)
        configs = [c for c in CONFIGS if not c[3]]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        device, size, warmup, steps, arch = torch.device("cuda"), 112, 10, args.steps, "iresnet50"
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        configs = CONFIGS
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.suite:
        print(f"{arch}, {size}x{size}, step only (synthetic tensors on the device), on {name}")
        rows = [r for r in SUITE if not (args.cpu_smoke and r[4])]
        shrink = (lambda batch, ids: (max(4, batch // 32), min(ids, 64))) if args.cpu_smoke else None
        results = run_rows(rows, device, size, arch, warmup, steps, shrink)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": name, "arch": arch, "input_size": size, "results": results}, f, indent=2)
        return 0
    batch = 4 if args.cpu_smoke else 128
    print(f"{arch}, {size}x{size}, batch {batch}, {args.num_ids} classes, on {name}")
    results = {}
    for method in ("pretrain", "virface"):
        for label, amp, channels_last, compile_ in configs:
            r = measure(method, amp, channels_last, compile_, device, arch, size, batch,
                        args.num_ids, warmup if not compile_ else warmup + 5, steps)
            results[f"{method}/{label}"] = r
            print(f"  {method:<9} {label:<28} {r['images_per_s']:9.1f} images/s   "
                  f"peak {r['peak_mem_gib']:.2f} GiB", flush=True)
    for label, *_ in configs:
        ratio = results[f"virface/{label}"]["images_per_s"] / results[f"pretrain/{label}"]["images_per_s"]
        print(f"  virface / pretrain throughput, {label}: {ratio:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
