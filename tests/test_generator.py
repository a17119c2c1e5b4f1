"""The generator: layer sizes, sampling layout and the reference's loss terms."""
import pytest
import torch

from virface.generator import FeatureVAE, draw_agreement, generator_losses


def constant_vae(decoded, mu_bias=0.0, logvar_bias=0.0, residual=False):
    """A VAE whose encoder outputs constant (mu, logvar) and whose decoder outputs ``decoded``."""
    g = FeatureVAE(feat_len=2, hidden=3, latent=2, residual=residual)
    with torch.no_grad():
        for lin, bias in ((g.to_mu, mu_bias), (g.to_logvar, logvar_bias)):
            lin.weight.zero_()
            lin.bias.fill_(bias)
        g.decoder[-1].weight.zero_()
        g.decoder[-1].bias.copy_(torch.tensor(decoded))
    return g


def test_reference_layer_sizes():
    g = FeatureVAE()                                   # train.py passes 512 (the features' size)
    assert g.encoder[0].in_features == 512 and g.encoder[0].out_features == 256
    assert g.to_mu.out_features == 128 and g.to_logvar.out_features == 128
    assert g.decoder[0].in_features == 128 and g.decoder[-1].out_features == 512


def test_mse_is_elementwise_mean_against_the_class_weight():
    g = constant_vae([2.0, 0.0])                                  # normalised: (1, 0)
    mse, kl = generator_losses(g, torch.randn(4, 2), torch.tensor([[0.0, 3.0]]).expand(4, 2))
    # (1 - 0)^2 + (0 - 1)^2 = 2 per row, mean over D = 2 elements -> 1.0 (= 2(1 - cos)/D)
    assert torch.isclose(mse, torch.tensor(1.0))
    assert torch.isclose(kl, torch.tensor(0.0))                   # mu = 0, logvar = 0


def test_kl_is_mean_over_elements():
    g = constant_vae([1.0, 0.0], mu_bias=1.0, logvar_bias=0.0)
    _, kl = generator_losses(g, torch.randn(3, 2), torch.tensor([[1.0, 0.0]]).expand(3, 2))
    # -0.5 * (1 + 0 - 1 - 1) = 0.5 for every element; the mean is 0.5 (a sum would be 3.0)
    assert torch.isclose(kl, torch.tensor(0.5))


def test_mse_and_kl_against_values_worked_out_by_hand_off_the_axes():
    # decoded (1, 0) against W_y at 53 degrees, (0.6, 0.8): ((1 - 0.6)^2 + (0 - 0.8)^2) / 2 = 0.4
    g = constant_vae([5.0, 0.0], logvar_bias=1.0)
    mse, kl = generator_losses(g, torch.randn(2, 2), torch.tensor([[3.0, 4.0]]).expand(2, 2))
    assert torch.isclose(mse, torch.tensor(0.4))
    # mu = 0, logvar = 1: -0.5 * (1 + 1 - 0 - e) = 0.359141
    assert torch.isclose(kl, torch.tensor(0.359141), atol=1e-6)


def test_a_residual_generator_steps_from_its_input():
    g = constant_vae([0.5, -0.5], logvar_bias=-30.0, residual=True)      # no noise to speak of
    x = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    decoded, _, _ = g(x)
    assert torch.allclose(decoded, x + torch.tensor([0.5, -0.5]), atol=1e-6)
    want = torch.nn.functional.normalize(x + torch.tensor([0.5, -0.5]), dim=1)
    assert torch.allclose(g.sample(x, 2), want.repeat(2, 1), atol=1e-6)
    plain = constant_vae([0.5, -0.5], logvar_bias=-30.0)
    assert torch.allclose(plain(x)[0], torch.tensor([[0.5, -0.5]]).expand(2, 2), atol=1e-6)


def test_losses_never_reach_backbone_features_or_class_weights():
    x = torch.randn(5, 2, requires_grad=True)
    w = torch.randn(5, 2, requires_grad=True)
    mse, kl = generator_losses(FeatureVAE(2, 3, 2), x, w)
    (5e3 * mse + 2.0 * kl).backward()
    assert x.grad is None and w.grad is None


def test_sample_is_sample_major_and_normalised():
    g = FeatureVAE(4, 8, 3)
    with torch.no_grad():
        g.to_logvar.bias.fill_(-30.0)     # sigma ~ 0: every draw decodes mu
        g.to_logvar.weight.zero_()
    u = torch.randn(3, 4)
    out = g.sample(u, gen_num=2)
    assert out.shape == (6, 4)
    assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(out[:3], out[3:], atol=1e-4)           # draw 1 of all U, then draw 2


def test_draws_spread_by_the_standard_deviation_exp_half_logvar():
    # z = mu + exp(logvar / 2) * N(0, 1): for mu = (0, 2, -1) and variances (4, 0.01, 1) the
    # draws have means (0, 2, -1) and standard deviations (2, 0.1, 1).
    n = 200_000
    mu = torch.tensor([0.0, 2.0, -1.0]).repeat(n, 1)
    logvar = torch.log(torch.tensor([4.0, 0.01, 1.0])).repeat(n, 1)
    torch.manual_seed(0)
    z = FeatureVAE.reparameterise(mu, logvar)
    # Standard errors: mean sd / sqrt(n) <= 0.0045, sd about sd / sqrt(2n) <= 0.0032.
    assert torch.allclose(z.mean(0), torch.tensor([0.0, 2.0, -1.0]), atol=0.02)
    assert torch.allclose(z.std(0), torch.tensor([2.0, 0.1, 1.0]), rtol=0.01)


def test_sample_draws_around_the_encoded_mean_with_the_encoded_spread():
    # Encoder outputs mu = 0.5, logvar = log 0.04 (sd 0.2) in both latent dims; the decoder is
    # relu(z) -> identity, so each instance's direction is (z1, z2) normalised.
    g = FeatureVAE(feat_len=2, hidden=2, latent=2)
    with torch.no_grad():
        for lin, bias in ((g.to_mu, 0.5), (g.to_logvar, float(torch.log(torch.tensor(0.04))))):
            lin.weight.zero_()
            lin.bias.fill_(bias)
        g.decoder[0].weight.copy_(torch.eye(2))
        g.decoder[0].bias.zero_()
        g.decoder[2].weight.copy_(torch.eye(2))
        g.decoder[2].bias.zero_()
    torch.manual_seed(0)
    with torch.no_grad():
        out = g.sample(torch.randn(4, 2), gen_num=20_000)          # (80000, 2), unit rows
    # z1, z2 ~ N(0.5, 0.2^2) independent (positive but for 0.6 %): the angle atan2(z2, z1) - pi/4
    # has sd close to 0.2 / (0.5 * sqrt 2) = 0.283 for this small spread; a spread of 0.04 (the
    # variance taken for the sd) or 1 would give 0.06 or well over 0.5.
    angle = torch.atan2(out[:, 1], out[:, 0]) - torch.pi / 4
    assert abs(float(angle.mean())) < 0.01
    assert 0.25 < float(angle.std()) < 0.32


def test_draw_agreement_is_the_mean_cosine_between_two_draws_from_each_normalised_row():
    torch.manual_seed(0)
    g = FeatureVAE(feat_len=4, hidden=8, latent=3)
    x = 3.0 * torch.randn(5, 4)                         # not normalised: the generator sees rows that are
    torch.manual_seed(1)
    got = draw_agreement(g, x)
    torch.manual_seed(1)
    rows = torch.nn.functional.normalize(x, dim=1)
    first, second = (torch.nn.functional.normalize(g(rows)[0], dim=1) for _ in range(2))
    assert torch.allclose(got, (first * second).sum(1).mean())
    assert float(got) < 0.999                          # a generator whose noise matters disagrees with itself
    with torch.no_grad():                              # ... and one without noise agrees exactly
        g.to_logvar.weight.zero_()
        g.to_logvar.bias.fill_(-80.0)
    assert float(draw_agreement(g, x)) == pytest.approx(1.0)
