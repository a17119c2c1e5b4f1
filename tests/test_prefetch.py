"""The prefetcher hands the step the loader's batches, in order, all of them. (Its CUDA path runs
in benchmarks/gpu_suite.sh, which trains through it on a GPU.)"""
import torch

from virface.data.prefetch import DevicePrefetcher


def batches(n):
    return [(torch.full((2, 3, 4, 4), i, dtype=torch.uint8), torch.tensor([i, -1]), i % 2) for i in range(n)]


def test_on_cpu_the_loaders_batches_pass_through_in_order():
    loader = batches(5)
    out = list(DevicePrefetcher(loader, torch.device("cpu")))
    assert len(out) == 5 and all(a is b for a, b in zip(out, loader))
    assert len(DevicePrefetcher(loader, "cpu")) == 5
