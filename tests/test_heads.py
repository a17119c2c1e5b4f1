"""ArcFace, VirClass and VirInstance logits against values worked out by hand."""
import math

import torch

from virface.heads import (ArcFaceHead, arcface_margin_logits, overlap_keep_mask, virclass_logits,
                           virinstance_logits)


def test_arcface_adds_the_angular_margin_to_the_target_only():
    cos = torch.tensor([[0.5, 0.2]])
    logits = arcface_margin_logits(cos, torch.tensor([0]), s=2.0, m=0.5)
    # theta = acos(0.5) = pi/3; cos(pi/3 + 0.5) = 0.0235966
    assert torch.allclose(logits, torch.tensor([[2 * 0.0235966, 0.4]]), atol=1e-6)


def test_arcface_falls_back_to_cos_minus_m_sin_m_past_pi():
    # cos = -0.9 < cos(pi - 0.5) = -0.87758: theta + m > pi, so the target logit is
    # cos - m*sin(m) = -0.9 - 0.5*0.479426 = -1.139713
    logits = arcface_margin_logits(torch.tensor([[-0.9, 0.1]]), torch.tensor([0]), s=1.0, m=0.5)
    assert torch.allclose(logits, torch.tensor([[-1.139713, 0.1]]), atol=1e-6)


def test_arcface_clamps_cosines_a_rounding_error_put_outside_minus_one_to_one():
    # Normalised products can come out a hair past +-1; acos of them would be NaN.
    cos = torch.tensor([[1.0 + 1e-6, -1.0 - 1e-6], [-1.0 - 1e-6, 1.0 + 1e-6]])
    logits = arcface_margin_logits(cos, torch.tensor([0, 0]), s=1.0, m=0.5)
    want = torch.tensor([[math.cos(0.5), -1.0], [-1.0 - 0.5 * math.sin(0.5), 1.0]])
    assert torch.isfinite(logits).all() and torch.allclose(logits, want, atol=1e-5)
    # Larger excursions are clamped to the same values, not extrapolated.
    assert torch.allclose(arcface_margin_logits(1.5 * torch.sign(cos), torch.tensor([0, 0]), 1.0, 0.5), want,
                          atol=1e-5)


def test_virclass_appends_each_unlabeled_feature_as_a_negative_class():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[3.0, 0.0]])                    # norm -> (1, 0), label 0
    u = torch.tensor([[0.0, 2.0], [-5.0, 0.0]])       # norm -> (0, 1), (-1, 0)
    logits = virclass_logits(x, torch.tensor([0]), weight, u, s=1.0, m=0.0)
    assert logits.shape == (1, 4)                     # C + U columns
    assert torch.allclose(logits, torch.tensor([[1.0, 0.0, 0.0, -1.0]]))
    with_margin = virclass_logits(x, torch.tensor([0]), weight, u, s=1.0, m=0.5)
    assert torch.allclose(with_margin, torch.tensor([[math.cos(0.5), 0.0, 0.0, -1.0]]), atol=1e-6)


def test_virclass_gradient_reaches_the_unlabeled_features():
    u = torch.tensor([[0.6, 0.8]], requires_grad=True)
    logits = virclass_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.eye(2), u, 2.0, 0.5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0])).backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_virinstance_targets_are_own_virtual_class_in_sample_major_order():
    weight = torch.eye(3)[:2]                        # C = 2, D = 3
    centres = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    instances = torch.cat([centres, centres])         # gen_num = 2: [draw 1 of both; draw 2 of both]
    logits, target = virinstance_logits(instances, weight, centres, gen_num=2, s=1.0, m=0.0)
    assert target.tolist() == [2, 3, 2, 3]
    assert logits.shape == (4, 4)
    assert torch.allclose(logits[0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # Sources taken from the second half of the (all-rank) centres: targets shift by the offset.
    _, shifted = virinstance_logits(centres[1:], weight, centres, gen_num=1, s=1.0, m=0.0, source_offset=1)
    assert shifted.tolist() == [3]


def test_virinstance_does_not_move_the_virtual_centres():
    centres = torch.tensor([[0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0]], requires_grad=True)
    logits, target = virinstance_logits(torch.tensor([[0.6, 0.8]]), weight, centres, 1, 4.0, 0.5)
    torch.nn.functional.cross_entropy(logits, target).backward()
    assert centres.grad is None and weight.grad is not None


def test_overlap_filter_drops_samples_confidently_inside_a_labeled_class():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # u0: softmax(32*[1, 0]) peaks at ~1.0 -> dropped; u1 sits between classes: p = 0.5 -> kept.
    assert overlap_keep_mask(u, weight, s=32.0, threshold=0.8).tolist() == [False, True]


def test_dropout_applies_to_labeled_features_in_both_logits_and_zero_draws_nothing():
    head = ArcFaceHead(2, 4, s=1.0, m=0.0, dropout=0.99).train()
    x = torch.ones(64, 4)
    labels = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(0)
    plain = head(x, labels)
    assert not torch.allclose(plain, plain[0].expand_as(plain))   # rows differ: dropped out
    vc = head.virclass(x, labels, torch.ones(1, 4))
    assert not torch.allclose(vc, vc[0].expand_as(vc))
    # p = 0: identical rows, and the random stream is untouched (a run without dropout repeats).
    off = ArcFaceHead(2, 4, s=1.0, m=0.0, dropout=0.0).train()
    torch.manual_seed(0)
    plain = off(x, labels)
    assert torch.allclose(plain, plain[0].expand_as(plain))
    assert torch.equal(torch.rand(3), _rand_after_seed())


def test_the_default_dropout_is_the_references_per_stage():
    from virface.config import TrainConfig

    assert TrainConfig(method="pretrain").resolved_dropout == 0.0
    assert TrainConfig(method="virclass").resolved_dropout == 0.5
    assert TrainConfig(method="virface").resolved_dropout == 0.5
    assert TrainConfig(method="pretrain", dropout=0.3).resolved_dropout == 0.3


def _rand_after_seed():
    torch.manual_seed(0)
    return torch.rand(3)


def test_dropout_is_inactive_in_eval_mode():
    # In eval mode the head's logits are the plain ones, cos(x, W) * s, for every row, however
    # high the dropout rate, and no random numbers are drawn.
    head = ArcFaceHead(3, 4, s=2.0, m=0.0, dropout=0.99).eval()
    x = torch.tensor([[1.0, 2.0, 2.0, 4.0]]).repeat(16, 1)           # |x| = 5
    labels = torch.zeros(16, dtype=torch.long)
    w = head.weight.detach()
    expected = 2.0 * (x / 5.0) @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.manual_seed(0)
    assert torch.allclose(head(x, labels), expected, atol=1e-6)
    u = torch.tensor([[0.0, 3.0, 0.0, 4.0]])                          # |u| = 5
    vc = head.virclass(x, labels, u)
    assert torch.allclose(vc[:, :3], expected, atol=1e-6)
    assert torch.allclose(vc[:, 3], torch.full((16,), 2.0 * (6.0 + 16.0) / 25.0), atol=1e-6)
    assert torch.equal(torch.rand(3), _rand_after_seed())


def test_one_drawn_instance_has_a_loss_and_the_defaults_are_no_offset_and_detached_centres():
    head = ArcFaceHead(num_classes=1, feat_len=2, s=4.0, m=0.5, dropout=0.0)
    centres = torch.tensor([[0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    one = torch.tensor([[0.0, 1.0]])
    loss = head.virinstance_loss(one, centres, gen_num=1)
    assert loss.item() > 0                             # a single instance is not "none drawn"
    loss.backward()
    assert centres.grad is None                        # detached by default
    logits, target = head.virinstance(one, centres, gen_num=1)
    assert target.tolist() == [1]                      # C + 0: the first source, no offset
    torch.nn.functional.cross_entropy(logits, target).backward()
    assert centres.grad is None
    assert torch.allclose(head.virinstance_loss(one, centres, gen_num=1),
                          torch.nn.functional.cross_entropy(logits, target))
    assert head.virinstance_loss(torch.zeros(0, 2), centres, gen_num=1).item() == 0.0


def test_the_head_defaults_are_the_references_s_32_m_0_5():
    head = ArcFaceHead(3, 4)
    assert (head.s, head.m, head.dropout.p) == (32.0, 0.5, 0.5)
