"""The ArcFace head and the VirFace logits built on it.

Everything here works on cosines: features and class weights are L2-normalised first. The margin
functions are pure (cosines in, logits out) so each can be checked by hand; ``ArcFaceHead`` only
owns the class-weight matrix W (C x D) and the labeled-feature dropout.

Notation (shapes): labeled features x (B, D), unlabeled features u (U, D), W (C, D).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def arcface_margin_logits(cos: torch.Tensor, target: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """ArcFace logits from cosines.

    cos: (B, K) float in [-1, 1]; target: (B,) long in [0, K). Returns (B, K): s*cos(theta + m)
    for the target column and s*cos(theta) elsewhere. Where theta + m > pi, cos(theta + m) stops
    being monotonic in theta, so (as in insightface and the reference) the target logit falls back
    to s*(cos(theta) - m*sin(m)).
    """
    cos = cos.clamp(-1.0, 1.0)
    cos_t = cos.gather(1, target[:, None])
    sin_t = (1.0 - cos_t * cos_t).clamp_min(0.0).sqrt()
    phi = cos_t * math.cos(m) - sin_t * math.sin(m)
    phi = torch.where(cos_t > math.cos(math.pi - m), phi, cos_t - m * math.sin(m))
    return s * cos.scatter(1, target[:, None], phi)


def virclass_logits(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, u: torch.Tensor,
                    s: float, m: float) -> torch.Tensor:
    """VirClass: every unlabeled feature of the batch is one more (negative-only) class.

    x: (B, D) labeled features, labels: (B,) in [0, C), weight: (C, D), u: (U, D) unlabeled
    features (not detached: L_vc reaches the backbone through u, as in the reference).
    Returns (B, C + U) logits against [W; u] with the margin on the true labeled class only.
    """
    centres = torch.cat([F.normalize(weight, dim=1), F.normalize(u, dim=1)], dim=0)
    cos = F.normalize(x, dim=1) @ centres.t()
    return arcface_margin_logits(cos, labels, s, m)


def virinstance_logits(instances: torch.Tensor, weight: torch.Tensor, centres: torch.Tensor, gen_num: int,
                       s: float, m: float, source_offset: int = 0,
                       centre_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """VirInstance: generated instances classified into their own virtual class.

    instances: (gen_num * n, D), sample-major ([all n for draw 1; all n for draw 2; ...]), as
    ``FeatureVAE.sample`` returns them, drawn from centres[source_offset : source_offset + n].
    centres: (U, D) every virtual-class centre (under data parallelism, those of all ranks),
    detached here (the reference's W_all_fix) unless ``centre_grad`` (not the reference's: L_vi
    then reaches the backbone through them). Returns logits (gen_num * n, C + U) against
    [W; centres] with the margin on each instance's own virtual class, and the targets
    C + source_offset + i.
    """
    num_classes = weight.shape[0]
    n_sources = instances.shape[0] // max(gen_num, 1)
    all_centres = torch.cat([F.normalize(weight, dim=1), F.normalize(centres if centre_grad else centres.detach(), dim=1)], dim=0)
    cos = F.normalize(instances, dim=1) @ all_centres.t()
    own = num_classes + source_offset + torch.arange(n_sources, device=instances.device)
    target = own.repeat(gen_num)
    return arcface_margin_logits(cos, target, s, m), target


@torch.no_grad()
def overlap_keep_mask(u: torch.Tensor, weight: torch.Tensor, s: float, threshold: float) -> torch.Tensor:
    """Which unlabeled samples to keep as virtual classes: (U,) bool.

    A sample whose softmax over the labeled classes, softmax(s * cos(u, W)), peaks at or above
    ``threshold`` probably belongs to a labeled identity; making it a negative would push it away
    from its own class, so it is dropped (the reference's dead-code filter, made reachable).
    """
    cos = F.normalize(u.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()
    return torch.softmax(s * cos, dim=1).amax(dim=1) < threshold


class ArcFaceHead(nn.Module):
    """Owns the class weights W (num_classes, feat_len), Xavier-uniform initialised.

    ``dropout`` is applied to the labeled features before their logits. The reference used 0.5
    in virclass / virface and none in plain ArcFace training (the TrainConfig default); here it
    is one setting for every stage, so a baseline can be given the same.
    """

    def __init__(self, num_classes: int, feat_len: int, s: float = 32.0, m: float = 0.5,
                 dropout: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, feat_len))
        nn.init.xavier_uniform_(self.weight)
        self.s, self.m = s, m
        self.dropout = nn.Dropout(dropout)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        # p = 0 skips the module: even a no-op dropout draws random numbers, and a run without
        # dropout should see the same random stream whatever this setting's history.
        return self.dropout(x) if self.dropout.p > 0 else x

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Plain ArcFace logits (B, C), with dropout on the features."""
        cos = F.normalize(self.drop(x), dim=1) @ F.normalize(self.weight, dim=1).t()
        return arcface_margin_logits(cos, labels, self.s, self.m)

    def virclass(self, x: torch.Tensor, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """VirClass logits (B, C + U) with dropout on the labeled features."""
        return virclass_logits(self.drop(x), labels, self.weight, u, self.s, self.m)

    def virinstance(self, instances: torch.Tensor, centres: torch.Tensor, gen_num: int,
                    source_offset: int = 0, centre_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """VirInstance logits (gen_num * n, C + U) and their targets."""
        return virinstance_logits(instances, self.weight, centres, gen_num, self.s, self.m, source_offset,
                                  centre_grad)

    # The losses the steps take, the same for every head (virface.partial_fc.PartialFCHead too).

    def arcface_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x, labels), labels)

    def virclass_loss(self, x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.virclass(x, labels, centres), labels)

    def virinstance_loss(self, instances: torch.Tensor, centres: torch.Tensor, gen_num: int,
                         source_offset: int = 0, centre_grad: bool = False) -> torch.Tensor:
        """The mean VirInstance CE; 0 (not NaN) when no instance was drawn."""
        if instances.shape[0] == 0:
            return instances.new_zeros(())
        return F.cross_entropy(*self.virinstance(instances, centres, gen_num, source_offset, centre_grad))

    def class_centres(self, labels: torch.Tensor) -> torch.Tensor:
        """W's rows for ``labels``: the generator's target W_y."""
        return self.weight[labels]

    def overlap_keep_mask(self, u: torch.Tensor, threshold: float) -> torch.Tensor:
        return overlap_keep_mask(u, self.weight, self.s, threshold)

    def averaged_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients ranks average by hand (W is replicated on every rank)."""
        return list(self.parameters())
