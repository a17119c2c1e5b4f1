"""Partial FC: the head's share of a training step with r = 0.1 against r = 1.0, side by side.

The library's smallest backbone (``mobilefacenet_s`` on random 32 x 32 images, the built-in
data's size) feeds PartialFCHead over 1,000,000 identities. The two sample rates run in alternate steps on the same W (so a change in
the machine's load hits both), each step timed in two parts: the backbone's forward + backward
and the head's (logits, cross-entropy, backward to W and the features). Prints per rate the
median milliseconds, the head's share of the step, and the head's memory:

  - saved for backward: the bytes of the activations the head's graph keeps between forward
    and backward (parameters and input features excluded): the (B, K) logits and their kin;
  - peak: the growth of the process's peak resident memory during one head step (Linux
    VmHWM, reset before the step), or on CUDA the growth of the allocator's peak; it includes
    W's dense gradient (C x D), which both rates allocate.

The optimiser's step on W is timed apart: with momentum and weight decay it reads and writes all
C x D values whatever r is (as in arcface_torch), so it bounds what sampling saves.

    python benchmarks/partial_fc_cpu.py              # 1,000,000 identities, about a minute
    python benchmarks/partial_fc_cpu.py --smoke      # 2,000 identities, for the tests
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from virface.backbones import build_backbone  # noqa: E402
from virface.partial_fc import PartialFCHead  # noqa: E402

RATES = (0.1, 1.0)
BACKBONE, INPUT_SIZE = "mobilefacenet_s", 32     # a tiny real backbone: the head's share is visible


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(head: PartialFCHead, feats: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes the head's graph keeps for backward, each storage counted once."""
    exclude = {head.weight.untyped_storage().data_ptr(), feats.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head.cross_entropy(*head(feats, labels))
    loss.backward()
    head.weight.grad = None
    return sum(storages.values())


class PeakMemory:
    """Growth of the peak memory over a block: CUDA's allocator, else the process's VmHWM."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")             # resets VmHWM to the current resident size
                self.start = self._status_kb("VmRSS") * 1024
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.bytes = None if self.start is None else self._status_kb("VmHWM") * 1024 - self.start

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise OSError(f"/proc/self/status has no {key}")


def head_step(head: PartialFCHead, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    head.weight.grad = None                 # as zero_grad(set_to_none=True): W's gradient is new
    f = feats.detach().requires_grad_()
    head.cross_entropy(*head(f, labels)).backward()
    return f.grad


def run(num_classes: int, feat_len: int, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    backbone = build_backbone(BACKBONE, feat_len=feat_len, input_size=INPUT_SIZE).to(device)
    heads = {r: PartialFCHead(num_classes, feat_len, s=64.0, m=0.5, dropout=0.0, sample_rate=r).to(device)
             for r in RATES}
    for r in RATES[1:]:                     # one W for both: memory for one, and the same values
        heads[r].weight = heads[RATES[0]].weight
    weight = heads[RATES[0]].weight
    times = {r: {"backbone_ms": [], "head_ms": []} for r in RATES}
    for step in range(steps + 1):           # step 0 warms up
        for r in RATES:
            inputs = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, device=device)
            labels = torch.randint(0, num_classes, (batch,), device=device)
            sync(device)
            t0 = time.perf_counter()
            feats = backbone(inputs)
            sync(device)
            t1 = time.perf_counter()
            grad = head_step(heads[r], feats, labels)
            sync(device)
            t2 = time.perf_counter()
            feats.backward(grad)
            sync(device)
            t3 = time.perf_counter()
            backbone.zero_grad(set_to_none=True)
            if step:
                times[r]["backbone_ms"].append(1e3 * ((t1 - t0) + (t3 - t2)))
                times[r]["head_ms"].append(1e3 * (t2 - t1))
    results = {}
    for r in RATES:
        backbone_ms = statistics.median(times[r]["backbone_ms"])
        head_ms = statistics.median(times[r]["head_ms"])
        feats = backbone(torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, device=device)).detach()
        labels = torch.randint(0, num_classes, (batch,), device=device)
        saved = saved_activation_bytes(heads[r], feats, labels)
        with PeakMemory(device) as peak:
            head_step(heads[r], feats, labels)
            sync(device)
        weight.grad = None
        results[r] = {"backbone_ms": backbone_ms, "head_ms": head_ms,
                      "head_share": head_ms / (head_ms + backbone_ms),
                      "columns": int(heads[r].sampled_classes().numel()),
                      "saved_for_backward_mb": saved / 2**20,
                      "head_peak_mb": None if peak.bytes is None else peak.bytes / 2**20}
    # The optimiser's step on W: the same work at every r.
    weight.grad = torch.zeros_like(weight)
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    sgd_ms = []
    for step in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        if step:
            sgd_ms.append(1e3 * (time.perf_counter() - t0))
    return {"num_classes": num_classes, "feat_len": feat_len, "batch": batch, "steps": steps,
            "device": str(device), "threads": torch.get_num_threads(),
            "rates": {str(r): v for r, v in results.items()}, "sgd_step_on_w_ms": statistics.median(sgd_ms)}


def report(figures: dict) -> None:
    print(f"Partial FC, {figures['num_classes']:,} identities, {BACKBONE} at {INPUT_SIZE} px, feat_len "
          f"{figures['feat_len']}, batch "
          f"{figures['batch']}, {figures['device']} ({figures['threads']} thread(s)); median of "
          f"{figures['steps']} steps, the rates alternating")
    print(f"{'r':>5} {'columns':>9} {'backbone ms':>12} {'head ms':>10} {'head share':>11} "
          f"{'saved for bwd MB':>17} {'head peak MB':>13}")
    rates = figures["rates"]
    for r, v in rates.items():
        peak = "n/a" if v["head_peak_mb"] is None else f"{v['head_peak_mb']:.1f}"
        print(f"{r:>5} {v['columns']:>9,} {v['backbone_ms']:>12.2f} {v['head_ms']:>10.1f} "
              f"{v['head_share']:>11.3f} {v['saved_for_backward_mb']:>17.1f} {peak:>13}")
    low, full = rates[str(RATES[0])], rates[str(RATES[1])]
    step = lambda v: v["head_ms"] + v["backbone_ms"]  # noqa: E731
    print(f"r = {RATES[0]} / r = {RATES[1]}: head time {low['head_ms'] / full['head_ms']:.3f}, "
          f"step time {step(low) / step(full):.3f}, saved for backward "
          f"{low['saved_for_backward_mb'] / full['saved_for_backward_mb']:.3f}"
          + ("" if low["head_peak_mb"] is None or not full["head_peak_mb"] else
             f", head peak {low['head_peak_mb'] / full['head_peak_mb']:.3f}"))
    print(f"SGD step on W (momentum, weight decay; the same at every r): {figures['sgd_step_on_w_ms']:.1f} ms")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=1_000_000)
    p.add_argument("--feat-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per rate (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="2,000 identities, 1 step: a check, not a figure")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_classes, args.feat_len, args.batch, args.steps = 2_000, 16, 8, 1
    figures = run(args.num_classes, args.feat_len, args.batch, args.steps, torch.device(args.device))
    report(figures)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
