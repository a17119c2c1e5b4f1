"""Partial FC in the stages: every stage trains with --sample_rate, alone and as 2 gloo ranks on
Ray Train, and its checkpoints load into runs of any sample rate and any number of ranks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from virface.checkpoint import load_checkpoint
from virface.config import TrainConfig
from virface.stages import run_stage
from virface.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


@pytest.mark.slow
def test_two_ray_train_ranks_shard_w_and_write_one_full_checkpoint_that_any_run_resumes(tmp_path, shared_ray):
    # virface-train --workers 2: Ray Train's two gloo ranks each hold half of W (4 + 4 classes).
    synthetic = ["--synthetic", "n_labeled_ids=8", "--synthetic", "images_per_labeled_id=4",
                 "--synthetic", "n_unlabeled_ids=12", "--synthetic", "n_val_ids=8",
                 "--synthetic", "val_pairs=40", "--synthetic", "image_size=16"]
    fast = ["--arch", "mobilefacenet_s", "--feat_len", "16", "--label_batch_size", "8", "--steps_per_epoch", "3",
            "--max_epoch", "2", "--no-tensorboard", "--log_every", "0", "--device", "cpu"]
    # On the test process's shared Ray head (RAY_ADDRESS), as on a cluster.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-m", "virface.train", "--method", "pretrain", "--sample_rate", "0.5",
                          "--workers", "2", "--snapshot_prefix", str(tmp_path / "pre"), *fast, *synthetic],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    state = load_checkpoint(str(tmp_path / "pre" / "checkpoints" / "epoch_002.pt"))
    assert state["head"]["weight"].shape == (8, 16)                  # the full W, gathered
    momentum = next(v["momentum_buffer"] for v in state["optimizers"]["main"]["state"].values()
                    if v["momentum_buffer"].shape == (8, 16))
    # Both shards' rows were trained (rank 0 owns classes 0-3, rank 1 classes 4-7).
    assert torch.count_nonzero(momentum[:4]) > 0 and torch.count_nonzero(momentum[4:]) > 0
    # One process, another sample rate, resumes the 2-rank run's epoch 1.
    assert main(["--method", "pretrain", "--sample_rate", "1.0",
                 "--resume_file", str(tmp_path / "pre" / "checkpoints" / "epoch_001.pt")]) == 0
    assert [json.loads(x)["epoch"] for x in open(tmp_path / "pre" / "metrics.jsonl")] == [1, 2]
