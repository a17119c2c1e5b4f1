"""``virface-train --workers N``: one stage data-parallel on Ray Train (gloo on CPU), with the
run folder, resume and results of a one-process run, through a rank killed with SIGKILL."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from virface.checkpoint import load_checkpoint
from virface.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# No BatchNorm (its statistics would be per rank's half batch) and the same features for an image
# and its mirror (each rank draws its own random flips): with these, two ranks over a global
# batch compute exactly what one process computes over it.
NET = textwrap.dedent('''
    import torch.nn as nn

    class FlipInvariantLinear(nn.Module):
        def __init__(self, feat_len, input_size):
            super().__init__()
            self.fc = nn.Linear(3 * input_size * input_size, feat_len)

        def forward(self, x):
            return self.fc((x + x.flip(-1)).flatten(1))

    def build(feat_len, input_size=16):
        return FlipInvariantLinear(feat_len, input_size)
''')
# The same net, whose rank 1 kills itself (SIGKILL, no clean-up) at the start of epoch 2, once
# (MARKER records it): the module is imported where the model is built, in each Ray worker.
KILLING_RANK_1 = NET + textwrap.dedent('''
    import os, signal

    import virface.stages

    MARKER = {marker!r}
    original = virface.stages.StageRun.run_epoch

    def run_epoch(self):
        if self.ctx.rank == 1 and self.epoch == 1 and not os.path.exists(MARKER):
            open(MARKER, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    virface.stages.StageRun.run_epoch = run_epoch
''')
SYNTHETIC = ["--synthetic", "n_labeled_ids=8", "--synthetic", "images_per_labeled_id=4",
             "--synthetic", "n_unlabeled_ids=12", "--synthetic", "n_val_ids=8",
             "--synthetic", "val_pairs=40", "--synthetic", "image_size=16"]
# Global batches of 8 (4 per rank), 3 steps an epoch, no dropout, full softmax.
RUN = ["--method", "pretrain", "--arch", "flip_invariant_net:build", "--feat_len", "16",
       "--label_batch_size", "8", "--steps_per_epoch", "3", "--dropout", "0", "--device", "cpu",
       "--no-tensorboard", "--log_every", "0", *SYNTHETIC]


@pytest.fixture
def net_module(tmp_path, monkeypatch):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "flip_invariant_net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    return tmp_path / "modules"


def ray_train_cli(tmp_path, modules, *args):
    """``virface-train --workers 2`` in its own process: on the Ray at $RAY_ADDRESS (the test's
    shared head, whose workers were started without ``modules`` on their path) or, without it,
    on a Ray of its own that it starts and stops (whose workers inherit this environment)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(modules), REPO])}
    return subprocess.run([sys.executable, "-m", "virface.train", *RUN, "--workers", "2", *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def assert_same_weights(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    for part in ("backbone", "head"):
        for key, value in a[part].items():
            assert torch.allclose(value, b[part][key], rtol=1e-4, atol=1e-6), (part, key)


def test_two_ray_train_workers_train_exactly_as_one_process_over_the_same_global_batch(tmp_path, net_module,
                                                                                      shared_ray):
    # On a running cluster: the user's --arch module reaches the workers with the job (Ray's
    # py_modules), not through their PYTHONPATH.
    one = tmp_path / "one"
    assert main([*RUN, "--max_epoch", "3", "--snapshot_prefix", str(one)]) == 0
    two = tmp_path / "two"
    run = ray_train_cli(tmp_path, net_module, "--max_epoch", "2", "--snapshot_prefix", str(two))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "done: 2 epoch(s)" in run.stdout
    # The run folder of a one-process run; Ray Train's copies of the checkpoints are gone.
    assert sorted(os.listdir(two)) == ["best.pt", "checkpoints", "config.json", "metrics.jsonl"]
    assert sorted(os.listdir(two / "checkpoints")) == ["epoch_001.pt", "epoch_002.pt"]
    assert losses(two) == pytest.approx(losses(one)[:2], rel=1e-4)
    assert_same_weights(two / "checkpoints" / "epoch_002.pt", one / "checkpoints" / "epoch_002.pt")
    # --resume_file continues it, on two workers, as the one process went on.
    resumed = ray_train_cli(tmp_path, net_module, "--resume_file", str(two / "checkpoints" / "epoch_002.pt"),
                            "--max_epoch", "3")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [json.loads(x)["epoch"] for x in open(two / "metrics.jsonl")] == [1, 2, 3]
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert_same_weights(two / "checkpoints" / "epoch_003.pt", one / "checkpoints" / "epoch_003.pt")


def test_a_rank_killed_mid_run_restarts_the_group_from_the_last_checkpoint_and_loses_nothing(tmp_path, net_module,
                                                                                             shared_ray):
    marker = tmp_path / "killed"
    (net_module / "killing_net.py").write_text(KILLING_RANK_1.format(marker=str(marker)))
    one = tmp_path / "one"
    assert main([*RUN, "--max_epoch", "3", "--snapshot_prefix", str(one)]) == 0
    two = tmp_path / "two"
    run = ray_train_cli(tmp_path, net_module, "--max_epoch", "3", "--snapshot_prefix", str(two),
                        "--arch", "killing_net:build")
    assert marker.exists(), "rank 1 was never killed"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "continuing from" in run.stdout + run.stderr
    # Epoch 2 was trained again from epoch 1's checkpoint: each epoch once, as one process.
    assert [json.loads(x)["epoch"] for x in open(two / "metrics.jsonl")] == [1, 2, 3]
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert_same_weights(two / "best.pt", one / "best.pt")
    assert_same_weights(two / "checkpoints" / "epoch_003.pt", one / "checkpoints" / "epoch_003.pt")
