"""The VirFace generator: a VAE mapping a labeled feature to the centre of its class.

It is trained on labeled identities (input: normalised feature; target: its class weight W_y)
and then used on unlabeled features to draw virtual instances of their unseen identities.
Layer sizes follow the reference (D -> 256 -> 2 x 128, 128 -> 256 -> D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureVAE(nn.Module):
    """``residual=False`` (the reference): the decoder's output is the generated feature.
    ``residual=True`` (not the reference's): it is a step from the input, x + decoder(z), so an
    unlabeled feature's instances stay around it (and, trained towards W_y, move the way a
    labeled feature would towards its class centre)."""

    def __init__(self, feat_len: int = 512, hidden: int = 256, latent: int = 128,
                 residual: bool = False):
        super().__init__()
        self.residual = residual
        self.encoder = nn.Sequential(nn.Linear(feat_len, hidden), nn.ReLU(inplace=True))
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, feat_len))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> (mu, logvar), each (B, latent)."""
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, D) -> (decoded (B, D), mu, logvar)."""
        mu, logvar = self.encode(x)
        decoded = self.decoder(self.reparameterise(mu, logvar))
        return (x + decoded if self.residual else decoded), mu, logvar

    def sample(self, x: torch.Tensor, gen_num: int) -> torch.Tensor:
        """Virtual instances: encode each row once, decode ``gen_num`` draws, L2-normalise.

        x: (U, D) normalised unlabeled features. Returns (gen_num * U, D), sample-major
        ([draw 1 of all U; draw 2 of all U; ...]), which is the order ``virinstance_logits``
        expects.
        """
        mu, logvar = self.encode(x)
        mu = mu.repeat(gen_num, 1)
        logvar = logvar.repeat(gen_num, 1)
        decoded = self.decoder(self.reparameterise(mu, logvar))
        if self.residual:
            decoded = x.repeat(gen_num, 1) + decoded
        return F.normalize(decoded, dim=1)


def generator_losses(generator: FeatureVAE, x: torch.Tensor, class_weight: torch.Tensor,
                     target_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's reconstruction and KL terms, both means over elements.

    x: (B, D) labeled features; class_weight: (B, D) the rows W_y of their labels. Both are
    normalised and detached here: the generator learns from the backbone and head but never
    moves them (the reference let the 5e3-weighted MSE pull W; the authors' alternating scheme
    does not). ``target_grad=True`` keeps W_y attached, as the reference's joint optimiser
    did. Returns (mse, kl):
      mse = mean((norm(G(x)) - norm(W_y))^2) over B x D elements  (= batch mean of 2(1-cos)/D)
      kl  = -0.5 * mean(1 + logvar - mu^2 - exp(logvar)) over B x latent elements
    The caller weights them: L2 * mse + KL * kl (defaults 5e3 and 2.0).
    """
    decoded, mu, logvar = generator(F.normalize(x.detach(), dim=1))
    target = F.normalize(class_weight if target_grad else class_weight.detach(), dim=1)
    mse = (F.normalize(decoded, dim=1) - target).pow(2).mean()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()
    return mse, kl


def draw_agreement(generator: FeatureVAE, x: torch.Tensor) -> torch.Tensor:
    """The mean cosine between two draws from each row of x (B, D): 1 for a generator that
    ignores its noise. Differentiable; the diversity term pulls it to the real same-identity
    cosine."""
    x = F.normalize(x.detach(), dim=1)
    first, second = (F.normalize(generator(x)[0], dim=1) for _ in range(2))
    return (first * second).sum(1).mean()


class CovarianceTransfer:
    """Not the reference's: virtual instances by covariance transfer (no training), after the
    feature-transfer and ISDA line of work: an unlabeled feature u draws c + scale * e,
    e ~ N(0, Sigma), renormalised, where Sigma is the pooled within-identity covariance of
    labeled features: the variation labeled identities show around their own means, lent to
    identities seen once.

    The base c is u itself (``shrink`` 0), or u moved the fraction ``shrink`` of the way to its
    identity's estimated centre, mu + (I - Sigma Sigma_t^-1)(u - mu) (the linear least-squares
    estimate of the centre of the identity u came from, with mu and Sigma_t the labeled features'
    mean and total covariance). Why: zero-mean noise around u alone moves every draw *away* from
    the identity's other images on average (identity keep < 0 whatever Sigma); removing part of
    u's own within-identity deviation first is what lets draws sit nearer the identity than u.

    ``factor`` (D, r): Sigma = factor @ factor.T (r = D for the full covariance, fewer for its
    top-r eigen-directions). ``centre_map`` (D, D) = Sigma Sigma_t^-1 and ``mean`` (D,), needed
    only for ``shrink`` > 0.
    """

    def __init__(self, factor: torch.Tensor, scale: float = 1.0, shrink: float = 0.0,
                 centre_map: torch.Tensor | None = None, mean: torch.Tensor | None = None):
        if shrink and (centre_map is None or mean is None):
            raise ValueError("covariance transfer with shrink > 0 needs the centre map and mean "
                             "(estimate it with from_features)")
        self.factor, self.scale, self.shrink = factor, scale, shrink
        self.centre_map, self.mean = centre_map, mean

    @classmethod
    def from_features(cls, feats: torch.Tensor, labels: torch.Tensor, rank: int = 0,
                      scale: float = 1.0, shrink: float = 0.0) -> "CovarianceTransfer":
        """Estimate Sigma from labeled features (N, D) (normalised here) and their labels (N,):
        sum over identities k of sum_i (f_i - mean_k)(f_i - mean_k)^T / (N - K), identities of
        one image contributing nothing. ``rank`` 0 keeps every direction. With ``shrink`` > 0
        also the mean and total covariance (ridge 1e-3 of its mean eigenvalue, as N may be < D)."""
        feats = F.normalize(feats.float(), dim=1)
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        sums = torch.zeros(len(counts), feats.shape[1], dtype=feats.dtype, device=feats.device)
        sums.index_add_(0, inverse, feats)
        centred = feats - (sums / counts[:, None].to(feats.dtype))[inverse]
        dof = feats.shape[0] - len(counts)
        if dof <= 0:
            raise ValueError("covariance transfer needs an identity with at least two images")
        sigma = centred.t() @ centred / dof
        made = cls.from_covariance(sigma, rank, scale)
        if not shrink:
            return made
        mean = feats.mean(0)
        total = (feats - mean).t() @ (feats - mean) / max(1, feats.shape[0] - 1)
        ridge = 1e-3 * float(total.diagonal().mean()) * torch.eye(total.shape[0], dtype=total.dtype,
                                                                   device=total.device)
        # Sigma Sigma_t^-1 = (Sigma_t^-1 Sigma)^T, both symmetric: one solve.
        centre_map = torch.linalg.solve((total + ridge).double(), sigma.double()).t().to(sigma.dtype)
        return cls(made.factor, scale, shrink, centre_map, mean)

    @classmethod
    def from_covariance(cls, sigma: torch.Tensor, rank: int = 0, scale: float = 1.0) -> "CovarianceTransfer":
        """From a covariance (D, D), symmetric positive semi-definite."""
        evals, evecs = torch.linalg.eigh(sigma.double())          # ascending
        if rank:
            evals, evecs = evals[-rank:], evecs[:, -rank:]
        factor = (evecs * evals.clamp_min(0).sqrt()).to(sigma.dtype)
        return cls(factor, scale)

    @property
    def covariance(self) -> torch.Tensor:
        """(D, D) the Sigma draws follow (before the scale)."""
        return self.factor @ self.factor.t()

    def to(self, device: torch.device) -> "CovarianceTransfer":
        moved = (None if t is None else t.to(device) for t in (self.centre_map, self.mean))
        return CovarianceTransfer(self.factor.to(device), self.scale, self.shrink, *moved)

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """(U, D): the sources moved ``shrink`` of the way to their estimated identity centres."""
        if not self.shrink:
            return x
        return x - self.shrink * (x - self.mean) @ self.centre_map.t()

    def noise(self, n: int) -> torch.Tensor:
        """(n, D) draws of e ~ N(0, scale^2 Sigma), before any renormalisation."""
        z = torch.randn(n, self.factor.shape[1], device=self.factor.device, dtype=self.factor.dtype)
        return self.scale * z @ self.factor.t()

    def sample(self, x: torch.Tensor, gen_num: int) -> torch.Tensor:
        """As :meth:`FeatureVAE.sample`: x (U, D) normalised -> (gen_num * U, D) normalised,
        sample-major. Gradient flows to x (only)."""
        base = self.centre(x).repeat(gen_num, 1)
        return F.normalize(base + self.noise(base.shape[0]).to(base.dtype), dim=1)
