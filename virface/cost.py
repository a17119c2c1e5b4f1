"""What a backbone costs at inference: parameters, multiply-accumulates and batch-1 latency.

A search with several objectives (a Pareto front, see virface.search.pareto) weighs accuracy
against these; each trial measures its own model, on its own device, once before training.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

LATENCY_WARMUP_RUNS = 3
LATENCY_TIMED_RUNS = 10


def count_macs(model: nn.Module, images: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``images`` (B, 3, H, W): PyTorch's FLOP counter
    (which counts a multiply-add as 2 FLOPs, and only matmuls and convolutions) halved."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return int(counter.get_total_flops()) // 2


def batch1_latency_ms(model: nn.Module, images: torch.Tensor, warmup: int = LATENCY_WARMUP_RUNS,
                      runs: int = LATENCY_TIMED_RUNS) -> float:
    """Median wall time of a forward of ``images`` (1, 3, H, W), in milliseconds, after
    ``warmup`` untimed forwards (CUDA is synchronised around each timed one)."""
    cuda = images.device.type == "cuda"
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            if cuda:
                torch.cuda.synchronize(images.device)
            start = time.perf_counter()
            model(images)
            if cuda:
                torch.cuda.synchronize(images.device)
            if i >= warmup:
                times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def model_cost(backbone: nn.Module, input_size: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """``{"params": count, "macs": per image, "latency_ms": batch-1 median}`` of ``backbone`` at
    ``input_size`` px on ``device``, measured in eval mode; the module's mode is restored and the
    global random state is untouched."""
    device = torch.device(device)
    images = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        cost = {"params": sum(p.numel() for p in backbone.parameters()),
                "macs": count_macs(backbone, images),
                "latency_ms": batch1_latency_ms(backbone, images)}
    finally:
        backbone.train(was_training)
    return cost


def run_cost(run) -> dict[str, float]:
    """params, macs and latency_ms of a StageRun's backbone, at its input size, on its device."""
    return model_cost(run.models.backbone, run.config.input_size, run.ctx.device)
