"""The VirInstance variants: where L_vi's gradient goes in each, on one step of tiny models."""
import copy

import pytest
import torch

from virface.config import TrainConfig
from virface.distributed import DistributedContext
from virface.errors import ConfigError
from virface.generator import FeatureVAE
from virface.models import build_models, build_optimizers
from virface.steps import StageStep

BASE = dict(method="virface", arch="mobilefacenet_s", feat_len=8, input_size=16, num_ids=3,
            label_batch_size=4, unlabel_batch_size=4, gen_num=2, lr=0.1, dropout=0.0)


def one_step(epochs_done=5.0, **changes):
    """The models after one virface step from fixed weights and a fixed batch, ``epochs_done``
    into the run."""
    config = TrainConfig(**{**BASE, **changes})
    torch.manual_seed(0)
    models = build_models(config)
    step = StageStep(config, models, models.backbone, build_optimizers(config, models),
                     DistributedContext(torch.device("cpu")), None)
    step.epochs_done = epochs_done
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, -1, -1, -1, -1])
    torch.manual_seed(2)
    terms = step(images, labels)
    return models, terms


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_reference_l_vi_moves_w_but_not_the_backbone():
    without, terms = one_step(vi_weight=0.0)
    with_vi, _ = one_step(vi_weight=1.0)
    assert terms["loss_vi"] > 0
    assert same(without.backbone, with_vi.backbone)                  # sources and centres detached
    assert not torch.equal(without.head.weight, with_vi.head.weight)


def test_vi_to_backbone_reaches_the_backbone_but_leaves_the_generator_to_its_own_step():
    without, _ = one_step(vi_weight=0.0, vi_to_backbone=True)
    with_vi, _ = one_step(vi_weight=1.0, vi_to_backbone=True)
    assert not same(without.backbone, with_vi.backbone)
    assert same(without.generator, with_vi.generator)                # frozen for L_vi


def test_gen_target_grad_lets_the_generator_mse_pull_w_in_joint_mode():
    fixed, _ = one_step(optim_mode="joint", vi_weight=0.0, L2=5e3)
    pulled, _ = one_step(optim_mode="joint", vi_weight=0.0, L2=5e3, gen_target_grad=True)
    assert same(fixed.backbone, pulled.backbone)   # the MSE sees detached features either way
    assert not torch.equal(fixed.head.weight, pulled.head.weight)
    with pytest.raises(ConfigError, match="gen_target_grad: .* needs optim_mode joint"):
        TrainConfig(**{**BASE, "gen_target_grad": True})


def test_l_vi_warms_up_linearly_over_its_epochs():
    config = TrainConfig(**{**BASE, "vi_weight": 2.0, "vi_warmup_epochs": 4.0})
    step = StageStep.__new__(StageStep)
    step.config = config
    weights = []
    for done in (0.0, 1.0, 2.0, 4.0, 7.5):
        step.epochs_done = done
        weights.append(step.vi_weight())
    assert weights == [0.0, 0.5, 1.0, 2.0, 2.0]
    # A zero weight at the start: the first step's W update is the one without L_vi.
    start, _ = one_step(vi_weight=2.0, vi_warmup_epochs=4.0, epochs_done=0.0)
    off, _ = one_step(vi_weight=0.0)
    assert torch.equal(start.head.weight, off.head.weight)


def test_a_residual_generator_draws_around_its_input():
    torch.manual_seed(0)
    gen = FeatureVAE(8, residual=True)
    last = gen.decoder[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)          # a zero step: every draw is the input itself
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    assert torch.allclose(gen.sample(x, 2), x.repeat(2, 1), atol=1e-6)
    plain = copy.deepcopy(gen)
    plain.residual = False
    assert torch.allclose(plain.sample(x, 2).abs().sum(), torch.tensor(0.0))


def test_the_residual_choice_is_made_by_the_generator_stage_and_inherited(tmp_path, tiny_data):
    from virface.checkpoint import load_checkpoint
    from virface.stages import run_stage

    tiny = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, unlabel_batch_size=4,
                steps_per_epoch=1, max_epoch=1, gen_num=2, tensorboard=False, device="cpu")
    pre = run_stage(TrainConfig(method="pretrain", **tiny), str(tmp_path / "pre"), data=tiny_data)
    gen = run_stage(TrainConfig(method="generator", gen_residual=True, pretrained_file=pre.best_checkpoint, **tiny),
                    str(tmp_path / "gen"), data=tiny_data)
    assert load_checkpoint(gen.best_checkpoint)["model"]["gen_residual"] is True
    vf = run_stage(TrainConfig(method="virface", pretrained_file=gen.best_checkpoint, **tiny),
                   str(tmp_path / "vf"), data=tiny_data)
    assert load_checkpoint(vf.best_checkpoint)["config"]["gen_residual"] is True
    with pytest.raises(ConfigError, match="gen_residual: False was given, but .* was trained with gen_residual=True"):
        run_stage(TrainConfig(method="virface", gen_residual=False, pretrained_file=gen.best_checkpoint, **tiny),
                  str(tmp_path / "vf2"), data=tiny_data)
