"""The training loop against its step: images/s of ``run_stage`` (the loop virface-train runs:
loader, prefetch to the device, step, logging) and of the same step on tensors already on the
device, for one model, batch and precision, measured in one run. Plain torch (no Ray).

    python benchmarks/gpu_loop.py                    # iresnet50, 112 px, bf16, batch 256, on CUDA
    python benchmarks/gpu_loop.py --cpu-smoke        # tiny, on CPU: checks it runs

The data are random in-memory images (the loop's in-memory path: collated in the main process,
prefetched on a side stream); evaluation is off, so only training is timed. The loop's figure
is its second epoch's samples/s (the first pays for cuDNN's autotuning and the allocator).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from virface.config import TrainConfig  # noqa: E402
from virface.data.loading import StageData  # noqa: E402
from virface.data.sources import ArraySource  # noqa: E402
from virface.distributed import DistributedContext  # noqa: E402
from virface.models import build_models, build_optimizers  # noqa: E402
from virface.stages import run_stage  # noqa: E402
from virface.steps import StageStep  # noqa: E402


def random_faces(n_ids: int, per_id: int, size: int, seed: int = 0) -> StageData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_ids * per_id, size, size, 3), dtype=np.uint8)
    return StageData(ArraySource(images, np.repeat(np.arange(n_ids), per_id), "random"), None, {}, size)


def step_only(config: TrainConfig, device: torch.device, warmup: int, steps: int) -> float:
    """images/s of the step alone, on a batch already on the device."""
    torch.manual_seed(0)
    models = build_models(config)
    for module in models.modules():
        module.to(device)
    if config.channels_last and device.type == "cuda":
        models.backbone.to(memory_format=torch.channels_last)
    backbone = torch.compile(models.backbone) if config.compile else models.backbone
    step = StageStep(config, models, backbone, build_optimizers(config, models), DistributedContext(device), None)
    batch = config.label_batch_size
    images = torch.randint(0, 256, (batch, 3, config.input_size, config.input_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, config.num_ids, (batch,), device=device)
    for _ in range(warmup):
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        terms = step(images, labels)
    float(terms["loss"].detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def loop(config: TrainConfig, data: StageData, device: torch.device) -> float:
    """samples/s of run_stage's second epoch."""
    with tempfile.TemporaryDirectory() as run:
        result = run_stage(config.replace(max_epoch=2, eval=False, tensorboard=False, device=str(device)),
                           os.path.join(run, "loop"), data=data, on_progress=lambda p: None)
    return result.history[-1]["samples_per_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--arch", default="iresnet50")
    p.add_argument("--compile", action="store_true", help="torch.compile both (opt-in)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, size, batch, arch, amp, steps = torch.device("cpu"), 16, 8, "mobilefacenet_s", "none", 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        device, size, batch, arch, amp, steps = torch.device("cuda"), 112, args.batch, args.arch, "bf16", 40
        torch.backends.cudnn.benchmark = True
    n_ids, per_id = (4, 8) if args.cpu_smoke else (1000, 12)
    config = TrainConfig(method="pretrain", arch=arch, feat_len=512 if not args.cpu_smoke else 16,
                         input_size=size, num_ids=n_ids, label_batch_size=batch, amp=amp, lr=0.01,
                         steps_per_epoch=steps, compile=args.compile, log_every=0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    data = random_faces(n_ids, per_id, size)
    step_rate = step_only(config, device, warmup=3 if args.cpu_smoke else 10, steps=steps)
    loop_rate = loop(config, data, device)
    figures = {"device": name, "arch": arch, "input_size": size, "batch": batch, "amp": amp,
               "channels_last": config.channels_last and device.type == "cuda", "compile": args.compile,
               "step_images_per_s": step_rate, "loop_images_per_s": loop_rate,
               "loop_over_step": loop_rate / step_rate}
    print(f"{arch}, {size} px, batch {batch}, {amp}, on {name}: step {step_rate:,.0f} images/s, "
          f"loop (virface-train's) {loop_rate:,.0f} images/s, loop / step {loop_rate / step_rate:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
