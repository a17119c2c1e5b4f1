"""A virface step on two gloo ranks is the step of one process over the combined batch.

Each rank holds half the labeled and half the unlabeled rows. Every rank's unlabeled features
are virtual classes for every rank's labeled rows (all-gathered), and each rank draws VirInstance
instances from its own sources, whose virtual classes sit at that rank's offset among the
gathered centres. The losses averaged over the ranks, and the weights after the step, must
equal those of one process that sees all rows.

Two things are made deterministic so the comparison is exact: the backbone is a 1x1 convolution
and a spatial mean (a horizontal flip does not change its features, so the step's random flip
drawn per rank does not matter), and the generator's noise is a fixed function of its mean (an
instance of a source is the same whichever process draws it).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from virface.config import TrainConfig
from virface.distributed import DistributedContext
from virface.generator import FeatureVAE
from virface.heads import ArcFaceHead
from virface.models import StageModels, build_optimizers
from virface.steps import StageStep

WORLD, C, D, SIZE = 2, 5, 8, 6
LABELED, UNLABELED = 4, 4                # per step, over both ranks: 2 + 2 on each


class FlipInvariantNet(nn.Module):
    """(B, 3, S, S) -> (B, D): per-pixel features averaged over the image, no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.pixel = nn.Conv2d(3, 16, 1)
        self.out = nn.Linear(16, D)

    def forward(self, x):
        return self.out(torch.tanh(self.pixel(x)).mean(dim=(2, 3)))


class FixedNoiseVAE(FeatureVAE):
    """The generator with noise cos(7 mu) instead of N(0, 1) draws."""

    @staticmethod
    def reparameterise(mu, logvar):
        return mu + torch.exp(0.5 * logvar) * torch.cos(7.0 * mu)


def config_of(case):
    return TrainConfig(method="virface", feat_len=D, num_ids=C, label_batch_size=LABELED,
                       unlabel_batch_size=UNLABELED, gen_num=2, dropout=0.0, lr=0.05, momentum=0.9,
                       weight_decay=5e-4, vi_weight=1.0, L2=5.0, device="cpu", **case)


def step_once(config, state, images, labels, ctx):
    """The models' state after one virface step on ``images``, and the step's loss terms."""
    torch.manual_seed(0)
    models = StageModels(FlipInvariantNet(), ArcFaceHead(C, D, s=16.0, m=0.3, dropout=0.0), FixedNoiseVAE(D))
    for name, module in zip(("backbone", "head", "generator"), models.modules()):
        module.load_state_dict(state[name])
    backbone = nn.parallel.DistributedDataParallel(models.backbone) if ctx.is_distributed else models.backbone
    step = StageStep(config, models, backbone, build_optimizers(config, models), ctx, None)
    step.epochs_done = 1.0
    terms = {k: float(v.detach()) for k, v in step(images, labels).items()}
    after = {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
             for name, module in zip(("backbone", "head", "generator"), models.modules())}
    return after, terms


def rank_rows(rank, n_total):
    n = n_total // WORLD
    return slice(rank * n, (rank + 1) * n)


def _rank(rank, port, case, state, images, labels, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # This rank's half of the labeled rows, then its half of the unlabeled rows.
        lab, unl = rank_rows(rank, LABELED), rank_rows(rank, UNLABELED)
        mine = torch.cat([images[:LABELED][lab], images[LABELED:][unl]])
        mine_labels = torch.cat([labels[:LABELED][lab], labels[LABELED:][unl]])
        ctx = DistributedContext(torch.device("cpu"), rank, WORLD)
        torch.save(step_once(config_of(case), state, mine, mine_labels, ctx), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", [
    {"optim_mode": "alternate"},
    # The overlap filter's path (a threshold of 1 keeps every source) with the joint optimiser.
    {"optim_mode": "joint", "overlap_threshold": 1.0},
], ids=["alternate", "joint-overlap-filter"])
def test_two_ranks_take_the_step_of_one_process_over_both_halves(tmp_path, case):
    torch.manual_seed(1)
    state = {"backbone": FlipInvariantNet().state_dict(),
             "head": ArcFaceHead(C, D, s=16.0, m=0.3, dropout=0.0).state_dict(),
             "generator": FixedNoiseVAE(D).state_dict()}
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (LABELED + UNLABELED, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 3, 1, 4] + [-1] * UNLABELED)
    one, one_terms = step_once(config_of(case), state, images, labels, DistributedContext(torch.device("cpu")))
    assert one_terms["loss_vi"] > 0 and one_terms["virtual_classes"] == UNLABELED

    mp.spawn(_rank, args=(_free_port(), case, state, images, labels, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for key in ("loss", "loss_vc", "loss_vi", "gen_loss", "gen_mse", "gen_kl"):
        mean = sum(terms[key] for _, terms in ranks) / WORLD
        assert mean == pytest.approx(one_terms[key], rel=1e-5, abs=1e-6), key
    for _, terms in ranks:
        assert terms["virtual_classes"] == UNLABELED                # every rank's sources, gathered
    for after, _ in ranks:
        for name, params in one.items():
            for key, value in params.items():
                assert torch.allclose(after[name][key], value, rtol=1e-5, atol=1e-6), f"{name}.{key}"
        # And the step moved every part it trains.
        for name in ("backbone", "head", "generator"):
            assert any(not torch.equal(after[name][k], state[name][k]) for k in state[name]), name
