"""Partial FC in the stages: every stage trains with --sample_rate, alone and as 2 gloo ranks, and
its checkpoints load into runs of any sample rate and any number of ranks."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from virface.checkpoint import load_checkpoint
from virface.config import TrainConfig
from virface.distributed import DistributedContext
from virface.stages import run_stage

TINY = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, unlabel_batch_size=4,
            steps_per_epoch=2, max_epoch=1, gen_num=2, tensorboard=False, device="cpu", log_every=0)


def test_every_stage_trains_with_a_sampled_softmax_and_hands_on_a_full_w(tmp_path, tiny_data):
    pre = run_stage(TrainConfig(method="pretrain", sample_rate=0.5, **TINY), str(tmp_path / "pre"), data=tiny_data)
    state = load_checkpoint(pre.best_checkpoint)
    assert state["head"]["weight"].shape == (6, 16)                 # the full W, as ArcFaceHead's
    gen = run_stage(TrainConfig(method="generator", sample_rate=0.5, pretrained_file=pre.best_checkpoint, **TINY),
                    str(tmp_path / "gen"), data=tiny_data)
    vf = run_stage(TrainConfig(method="virface", sample_rate=0.5, pretrained_file=gen.best_checkpoint, **TINY),
                   str(tmp_path / "vf"), data=tiny_data)
    assert np.isfinite(vf.history[-1]["loss_vi"]) and vf.history[-1]["loss_vi"] > 0
    # A checkpoint of a sampled run starts a full-softmax run, and the other way round.
    vc = run_stage(TrainConfig(method="virclass", pretrained_file=pre.best_checkpoint, **TINY),
                   str(tmp_path / "vc"), data=tiny_data)
    back = run_stage(TrainConfig(method="virclass", sample_rate=0.25, pretrained_file=vc.best_checkpoint, **TINY),
                     str(tmp_path / "vc2"), data=tiny_data)
    assert np.isfinite(back.history[-1]["loss"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, folder):
    from conftest import random_stage_data

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        ctx = DistributedContext(torch.device("cpu"), rank, 2)
        data = random_stage_data()
        config = TrainConfig(method="pretrain", sample_rate=0.5, **{**TINY, "max_epoch": 2})
        run_stage(config, os.path.join(folder, "pre"), data=data, ctx=ctx)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_shard_w_and_write_one_full_checkpoint_that_any_run_resumes(tmp_path, tiny_data):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    state = load_checkpoint(str(tmp_path / "pre" / "checkpoints" / "epoch_002.pt"))
    assert state["head"]["weight"].shape == (6, 16)
    momentum = next(v["momentum_buffer"] for v in state["optimizers"]["main"]["state"].values()
                    if v["momentum_buffer"].shape == (6, 16))
    assert torch.count_nonzero(momentum) > 0                          # both shards' rows
    # One process, another sample rate, resumes the 2-rank run's epoch 1.
    resumed = run_stage(TrainConfig(method="pretrain", sample_rate=1.0, **{**TINY, "max_epoch": 2},
                                    resume_file=str(tmp_path / "pre" / "checkpoints" / "epoch_001.pt")),
                        str(tmp_path / "again"), data=tiny_data)
    assert [m["epoch"] for m in resumed.history] == [2]
