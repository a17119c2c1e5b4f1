"""The VirInstance variants: where L_vi's gradient goes in each, on one step of tiny models."""
import copy

import numpy as np
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


@pytest.mark.parametrize("mode", ["alternate", "joint"])
def test_the_step_loss_is_l_vc_plus_the_weighted_l_vi_plus_the_generator_loss(mode):
    """The total the step reports (and, in joint mode, differentiates) is L_vc + w L_vi + L_gen,
    with w the warm-up weight: half-way through a 2-epoch warm-up of weight 0.8, w = 0.4."""
    _, terms = one_step(epochs_done=1.0, optim_mode=mode, vi_weight=0.8, vi_warmup_epochs=2.0)
    assert terms["loss_vi"] > 0 and terms["gen_loss"] > 0
    want = terms["loss_vc"] + 0.4 * terms["loss_vi"] + terms["gen_loss"]
    assert float(terms["loss"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_with_vi_gen_grad_the_generator_step_takes_l_vi_too():
    """Alternate + vi_gen_grad: the generator's step takes w L_vi's gradient; without it the
    generator ignores L_vi."""
    reference, _ = one_step(vi_weight=1.0, L2=0.0, KL=0.0)
    with_grad, _ = one_step(vi_weight=1.0, L2=0.0, KL=0.0, vi_gen_grad=True)
    assert not same(reference.generator, with_grad.generator)
    # With L2 = KL = 0 the reference's generator step has nothing to descend.
    untouched, _ = one_step(vi_weight=0.0, L2=0.0, KL=0.0)
    assert same(reference.generator, untouched.generator)


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


# ---------------------------------------------------------------- issue 18's variants

def test_vi_centre_grad_gives_the_backbone_a_gradient_from_l_vi_through_the_centres_only():
    without, _ = one_step(vi_weight=0.0, vi_centre_grad=True)
    with_vi, _ = one_step(vi_weight=1.0, vi_centre_grad=True)
    assert not same(without.backbone, with_vi.backbone)
    assert same(without.generator, with_vi.generator)                # L_vi stays out of G's step


def test_vi_gen_grad_gives_the_generator_a_gradient_from_l_vi_in_alternate_mode_and_not_the_backbone():
    without, _ = one_step(vi_weight=0.0, vi_gen_grad=True)
    with_vi, _ = one_step(vi_weight=1.0, vi_gen_grad=True)
    assert not same(without.generator, with_vi.generator)
    assert same(without.backbone, with_vi.backbone)
    plain, _ = one_step(vi_weight=1.0)                 # the reference's alternate path: G never sees L_vi
    assert same(without.generator, plain.generator)
    with pytest.raises(ConfigError, match="vi_gen_grad: the joint optimiser already"):
        TrainConfig(**{**BASE, "vi_gen_grad": True, "optim_mode": "joint"})


def test_a_covariance_transfer_draw_has_the_covariance_it_was_given():
    from virface.generator import CovarianceTransfer

    a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 0.6]])
    sigma = a @ a.t()
    torch.manual_seed(0)
    draws = CovarianceTransfer.from_covariance(sigma).noise(200_000)
    assert torch.allclose(torch.cov(draws.t()), sigma, atol=0.02)
    # Low rank: the top eigen-direction of diag(4, 1, 0.25) alone; scale 2 doubles the std.
    draws = CovarianceTransfer.from_covariance(torch.diag(torch.tensor([1.0, 4.0, 0.25])), rank=1,
                                               scale=2.0).noise(200_000)
    assert torch.allclose(torch.cov(draws.t()), torch.diag(torch.tensor([0.0, 16.0, 0.0])), atol=0.15)


def test_covariance_transfer_estimates_the_pooled_within_identity_covariance_and_draws_around_u():
    from virface.generator import CovarianceTransfer

    # Identity 0: e1 and e2 (mean (0.5, 0.5); deviations +-(0.5, -0.5)); identity 1: e1 twice;
    # identity 2: one image. Scatter [[0.5, -0.5], [-0.5, 0.5]] over N - K = 5 - 3 = 2.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cov = CovarianceTransfer.from_features(feats, torch.tensor([0, 0, 1, 1, 2]))
    assert torch.allclose(cov.covariance, torch.tensor([[0.25, -0.25], [-0.25, 0.25]]), atol=1e-6)
    u = torch.nn.functional.normalize(torch.randn(4, 2), dim=1)
    assert torch.allclose(CovarianceTransfer(cov.factor, scale=0.0).sample(u, 3), u.repeat(3, 1))
    drawn = cov.sample(u, 3)
    assert torch.allclose(drawn.norm(dim=1), torch.ones(12)) and not torch.allclose(drawn, u.repeat(3, 1))


def test_covariance_transfer_shrinks_towards_the_centre_the_docstring_defines():
    from virface.generator import CovarianceTransfer

    # Sigma Sigma_t^-1 with Sigma the pooled within-identity covariance, Sigma_t the features'
    # total covariance over N - 1 plus a ridge of 1e-3 of its mean diagonal; worked in numpy.
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(12, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5])
    cov = CovarianceTransfer.from_features(feats, labels, shrink=0.5)
    f = torch.nn.functional.normalize(feats.float(), dim=1).double().numpy()
    lab = labels.numpy()
    centred = f - np.stack([f[lab == k].mean(0) for k in lab])
    sigma = centred.T @ centred / (12 - 6)
    mean = f.mean(0)
    total = (f - mean).T @ (f - mean) / 11
    total += 1e-3 * np.trace(total) / 3 * np.eye(3)
    expected_map = sigma @ np.linalg.inv(total)
    assert np.allclose(cov.mean.numpy(), mean, atol=1e-6) and np.allclose(cov.covariance.numpy(), sigma, atol=1e-6)
    assert np.allclose(cov.centre_map.numpy(), expected_map, atol=1e-5)
    x = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    expected = x.double().numpy() - 0.5 * (x.double().numpy() - mean) @ expected_map.T
    assert np.allclose(cov.centre(x).numpy(), expected, atol=1e-5)
    # A sample is the renormalised sum of the moved source and one noise draw per row,
    # sample-major (row k * U + i comes from source i).
    torch.manual_seed(7)
    drawn = cov.sample(x, 2)
    torch.manual_seed(7)
    noise = cov.noise(8)
    assert torch.allclose(drawn, torch.nn.functional.normalize(cov.centre(x).repeat(2, 1) + noise, dim=1), atol=1e-6)


def test_covariance_transfer_keeps_its_settings_through_to_and_from_features():
    from virface.generator import CovarianceTransfer

    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    plain = CovarianceTransfer.from_features(feats, labels)
    assert (plain.scale, plain.shrink, plain.centre_map, plain.mean) == (1.0, 0.0, None, None)
    assert plain.factor.shape == (2, 2)
    assert CovarianceTransfer.from_features(feats, labels, rank=1, scale=0.5).factor.shape == (2, 1)
    assert CovarianceTransfer.from_features(feats, labels, scale=0.5).scale == 0.5
    shrunk = CovarianceTransfer.from_features(feats, labels, scale=0.5, shrink=0.3)
    for original in (plain, shrunk):
        moved = original.to(torch.device("cpu"))
        assert (moved.scale, moved.shrink) == (original.scale, original.shrink)
        assert torch.equal(moved.factor, original.factor)
        for a, b in ((moved.centre_map, original.centre_map), (moved.mean, original.mean)):
            assert (a is None and b is None) or torch.equal(a, b)
    double = CovarianceTransfer(plain.factor.double())
    assert double.noise(3).dtype == torch.float64 and (double.scale, double.shrink) == (1.0, 0.0)
    # Two images of one identity: all the variation is within it, so the centre map removes
    # all of it along that direction (up to the ridge): both images map to their mean.
    two = CovarianceTransfer.from_features(feats[:2], torch.tensor([0, 0]), shrink=1.0)
    assert torch.allclose(two.centre(feats[:2]), feats[:2].mean(0).expand(2, 2), atol=2e-3)
    # One identity of two images is enough (1 degree of freedom); identities of one image only
    # are not, and shrinking needs the centre map and the mean.
    assert CovarianceTransfer.from_features(feats[:3], torch.tensor([0, 0, 1])).factor.shape == (2, 2)
    with pytest.raises(ValueError, match="^covariance transfer needs an identity with at least two images$"):
        CovarianceTransfer.from_features(feats[:3], torch.tensor([0, 1, 2]))
    for centre_map, mean in ((None, None), (None, shrunk.mean), (shrunk.centre_map, None)):
        with pytest.raises(ValueError, match=r"^covariance transfer with shrink > 0 needs the centre map and mean \(estimate it with from_features\)$"):
            CovarianceTransfer(plain.factor, shrink=0.3, centre_map=centre_map, mean=mean)


def identity_pairs(n_ids=300, noise=0.6, seed=0):
    """Features of identities whose centres vary in dims 0-3 and whose images vary around them in
    dims 4-7 only: (f_a, f_b) two images per identity, normalised."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(n_ids, 8)
    centres[:, :4] = torch.randn(n_ids, 4, generator=g)
    images = centres.repeat_interleave(2, 0)
    images[:, 4:] += noise * torch.randn(2 * n_ids, 4, generator=g)
    images = torch.nn.functional.normalize(images, dim=1)
    return images[0::2], images[1::2], torch.arange(n_ids).repeat_interleave(2)


def mean_cos(a, b):
    return float((torch.nn.functional.normalize(a, dim=1) * torch.nn.functional.normalize(b, dim=1)).sum(1).mean())


def test_zero_mean_noise_around_the_source_loses_identity_and_shrinking_to_the_centre_keeps_it():
    from virface.generator import CovarianceTransfer

    f_a, f_b, _ = identity_pairs(seed=1)
    train_a, train_b, labels = identity_pairs(seed=0)             # other identities estimate the maps
    train = torch.stack([train_a, train_b], 1).reshape(-1, 8)
    torch.manual_seed(0)
    real = mean_cos(f_a, f_b)
    plain = CovarianceTransfer.from_features(train, labels, scale=1.0)
    # The within-identity covariance lives in dims 4-7, as it was made (up to the normalisation).
    assert float(plain.covariance[:4].abs().max()) < 0.01 and float(plain.covariance[4:, 4:].trace()) > 0.1
    assert mean_cos(plain.sample(f_a, 1), f_b) < real                        # identity keep < 0
    shrunk = CovarianceTransfer.from_features(train, labels, scale=0.5, shrink=1.0)
    assert mean_cos(shrunk.sample(f_a, 1), f_b) > real + 0.05                # identity keep > 0
    # Shrink 1 moves a source (before noise) onto the estimated centre: its dims 4-7 mostly gone.
    centred = shrunk.centre(f_a)
    assert float(centred[:, 4:].norm(dim=1).mean()) < 0.3 * float(f_a[:, 4:].norm(dim=1).mean())
    assert torch.allclose(CovarianceTransfer.from_features(train, labels, shrink=0.0).centre(f_a), f_a)
    with pytest.raises(ValueError, match="shrink > 0 needs the centre map"):
        CovarianceTransfer(plain.factor, shrink=0.5)
    with pytest.raises(ConfigError, match="cov_shrink: 1.5 must be between 0 and 1"):
        TrainConfig(**{**BASE, "vi_generator": "covariance", "cov_shrink": 1.5})


def test_with_covariance_transfer_the_generator_stays_as_loaded_and_l_vi_trains_w_only():
    from virface.generator import CovarianceTransfer

    def cov_step(**changes):
        config = TrainConfig(**{**BASE, "vi_generator": "covariance", **changes})
        torch.manual_seed(0)
        models = build_models(config)
        before = copy.deepcopy(models.generator)
        step = StageStep(config, models, models.backbone, build_optimizers(config, models),
                         DistributedContext(torch.device("cpu")), None)
        step.instance_sampler = CovarianceTransfer.from_covariance(0.01 * torch.eye(8))
        images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        terms = step(images, torch.tensor([0, 1, 2, 0, -1, -1, -1, -1]))
        return models, before, terms

    without, before, terms = cov_step(vi_weight=0.0)
    with_vi, _, terms_vi = cov_step(vi_weight=1.0)
    for mode in ("alternate", "joint"):      # no optimiser holds the generator
        config = TrainConfig(**{**BASE, "vi_generator": "covariance", "optim_mode": mode})
        models = build_models(config)
        optimizers = build_optimizers(config, models)
        held = {id(p) for opt in optimizers.values() for g in opt.param_groups for p in g["params"]}
        assert list(optimizers) == ["main"] and not held & {id(p) for p in models.generator.parameters()}
        assert {id(p) for p in models.backbone.parameters()} <= held
    assert same(with_vi.generator, before) and "gen_loss" not in terms_vi
    assert terms_vi["loss_vi"] > 0
    assert same(without.backbone, with_vi.backbone) and not torch.equal(without.head.weight, with_vi.head.weight)
    through, _, _ = cov_step(vi_weight=1.0, vi_to_backbone=True)   # u + e: L_vi reaches u's backbone
    assert not same(without.backbone, through.backbone)


def test_same_identity_partners_are_other_images_of_the_same_identity():
    from virface.steps import same_identity_partners

    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    start = torch.tensor([0, 0, 2, 2, 2, 5, 5, 5, 5])
    size = torch.tensor([2, 2, 3, 3, 3, 4, 4, 4, 4])
    rows = torch.arange(9).repeat(2000)
    torch.manual_seed(0)
    partners = same_identity_partners(rows, start, size)
    assert bool((partners != rows).all()) and torch.equal(labels[partners], labels[rows])
    for r in (2, 5):                                    # every other image of the identity is drawn
        assert set(partners[rows == r].tolist()) == set(range(start[r], start[r] + size[r])) - {r}


def test_the_same_identity_generator_trains_on_bank_pairs_and_virface_keeps_it_fixed(tmp_path, tiny_data):
    from virface.checkpoint import load_checkpoint
    from virface.stages import run_stage

    tiny = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, unlabel_batch_size=4,
                steps_per_epoch=2, max_epoch=1, gen_num=2, tensorboard=False, device="cpu",
                diagnostic_pairs=8)
    pre = run_stage(TrainConfig(method="pretrain", **tiny), str(tmp_path / "pre"), data=tiny_data)
    gen = run_stage(TrainConfig(method="generator", gen_target="same_identity", gen_residual=True,
                                gen_diversity=1.0, pretrained_file=pre.best_checkpoint, **tiny),
                    str(tmp_path / "gen"), data=tiny_data)
    assert gen.history[0]["gen_diversity"] >= 0 and "vi_identity_keep" in gen.history[0]
    gen_state = load_checkpoint(gen.best_checkpoint)
    assert gen_state["model"]["gen_target"] == "same_identity"
    vf = run_stage(TrainConfig(method="virface", optim_mode="joint", pretrained_file=gen.best_checkpoint, **tiny),
                   str(tmp_path / "vf"), data=tiny_data)
    vf_state = load_checkpoint(vf.best_checkpoint)
    assert vf_state["config"]["gen_target"] == "same_identity" and "gen_loss" not in vf.history[0]
    assert all(torch.equal(gen_state["generator"][k], v) for k, v in vf_state["generator"].items())
    assert not torch.equal(gen_state["head"]["weight"], vf_state["head"]["weight"])


def test_the_covariance_variant_runs_as_a_virface_stage_and_reports_its_instances(tmp_path, tiny_data):
    from virface.stages import run_stage

    tiny = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, unlabel_batch_size=4,
                steps_per_epoch=1, max_epoch=1, gen_num=3, tensorboard=False, device="cpu",
                diagnostic_pairs=8)
    pre = run_stage(TrainConfig(method="pretrain", **tiny), str(tmp_path / "pre"), data=tiny_data)
    gen = run_stage(TrainConfig(method="generator", pretrained_file=pre.best_checkpoint, **tiny),
                    str(tmp_path / "gen"), data=tiny_data)
    vf = run_stage(TrainConfig(method="virface", vi_generator="covariance", cov_rank=4, cov_scale=0.5,
                               pretrained_file=gen.best_checkpoint, **tiny), str(tmp_path / "vf"), data=tiny_data)
    record = vf.history[0]
    assert record["loss_vi"] > 0 and record["vi_draw_cos"] < 1.0


def stage_step(**changes) -> StageStep:
    config = TrainConfig(**{**BASE, **changes})
    torch.manual_seed(0)
    models = build_models(config)
    return StageStep(config, models, models.backbone, build_optimizers(config, models),
                     DistributedContext(torch.device("cpu")), None)


def test_l_vi_ramps_up_linearly_over_a_warm_up_shorter_than_one_epoch():
    step = stage_step(vi_weight=0.8, vi_warmup_epochs=0.5)
    step.epochs_done = 0.25
    assert step.vi_weight() == pytest.approx(0.4)
    step.epochs_done = 2.0
    assert step.vi_weight() == pytest.approx(0.8)
    assert stage_step(vi_weight=0.8, vi_warmup_epochs=0.0).vi_weight() == pytest.approx(0.8)


def test_both_generator_losses_are_l2_mse_plus_kl_kl(monkeypatch):
    """The reference's (towards W_y) and the within-identity one (towards f_b)."""
    step = stage_step(method="generator", L2=10.0, KL=3.0)
    monkeypatch.setattr("virface.steps.generator_losses",
                        lambda g, a, b, **kw: (torch.tensor(0.2), torch.tensor(0.5)))
    want = {"gen_mse": 0.2, "gen_kl": 0.5, "gen_loss": 10.0 * 0.2 + 3.0 * 0.5}
    terms = step.same_identity_terms(torch.zeros(2, 8), torch.zeros(2, 8))
    assert {k: float(v) for k, v in terms.items()} == pytest.approx(want)
    terms = step.generator_terms(torch.zeros(2, 8), torch.tensor([0, 1]))
    assert {k: float(v) for k, v in terms.items()} == pytest.approx(want)


def test_the_diversity_term_is_the_squared_gap_to_the_real_same_identity_cosine(monkeypatch):
    step = stage_step(method="generator", gen_diversity=2.0)
    f_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_b = torch.tensor([[0.6, 0.8], [0.0, 1.0]])                 # cosines 0.6 and 1.0: mean 0.8
    monkeypatch.setattr(step, "bank_pairs", lambda n: (f_a, f_b))
    monkeypatch.setattr("virface.steps.draw_agreement", lambda g, x: torch.tensor(0.95))
    terms = step.with_diversity({"gen_loss": torch.tensor(1.0)}, torch.zeros(2, 8))
    assert float(terms["gen_diversity"]) == pytest.approx(0.15 ** 2)
    assert float(terms["gen_loss"]) == pytest.approx(1.0 + 2.0 * 0.15 ** 2)
