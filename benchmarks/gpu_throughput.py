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
            arch: str, size: int, batch: int, num_ids: int, warmup: int, steps: int) -> dict:
    n_unlabeled = batch // 2 if method == "virface" else 0
    config = TrainConfig(method=method, arch=arch, feat_len=512, input_size=size, num_ids=num_ids,
                         label_batch_size=batch - n_unlabeled, unlabel_batch_size=n_unlabeled or 1,
                         gen_num=5, amp=amp, lr=0.01)
    torch.manual_seed(0)
    models = build_models(config)
    for module in (models.backbone, models.head, models.generator):
        if module is not None:
            module.to(device)
    if channels_last:
        models.backbone.to(memory_format=torch.channels_last)
    backbone = torch.compile(models.backbone) if compile_ else models.backbone
    scaler = None
    step = StageStep(config, models, backbone, build_optimizers(config, models),
                     DistributedContext(device), scaler)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU; torch.compile skipped")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-ids", type=int, default=10000, help="classes of the ArcFace head")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, size, batch, warmup, steps = torch.device("cpu"), 16, 4, 1, 1
        args.num_ids = min(args.num_ids, 64)
        configs = [c for c in CONFIGS if not c[3]]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        device, size, batch, warmup, steps = torch.device("cuda"), 112, 128, 10, args.steps
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        configs = CONFIGS
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"iresnet50, {size}x{size}, batch {batch}, {args.num_ids} classes, on {name}")
    results = {}
    for method in ("pretrain", "virface"):
        for label, amp, channels_last, compile_ in configs:
            r = measure(method, amp, channels_last, compile_, device, "iresnet50", size, batch,
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
