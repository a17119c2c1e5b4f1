"""Partial FC: sampled and sharded ArcFace / VirClass / VirInstance logits.

The one-process references are the plain heads (``virface.heads``, pinned against hand-worked
values in test_heads.py) over the full W; the sharded head runs under 2 gloo processes.
"""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from virface.checkpoint import load_module_state
from virface.distributed import DistributedContext
from virface.errors import CheckpointError
from virface.heads import (ArcFaceHead, arcface_margin_logits, overlap_keep_mask, virclass_logits,
                           virinstance_logits)
from virface.partial_fc import (PartialFCHead, full_optimizer_state, load_optimizer_state, shard_range,
                                shard_rows)

S, M = 8.0, 0.5


def one_process(num_classes, feat_len, sample_rate=1.0, s=S, m=M, dropout=0.0):
    return PartialFCHead(num_classes, feat_len, s=s, m=m, dropout=dropout, sample_rate=sample_rate)


def leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- r = 1 is the full softmax


def test_rate_one_is_the_full_arcface_softmax_loss_and_gradients():
    head = one_process(10, 8)
    x, y = leaf(6, 8, seed=1), torch.tensor([0, 3, 3, 9, 5, 1])
    loss = head.cross_entropy(*head(x, y))
    loss.backward()

    w = head.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(arcface_margin_logits(F.normalize(x_ref, dim=1) @ F.normalize(w, dim=1).t(),
                                                y, S, M), y)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-6
    assert torch.allclose(head.weight.grad, w.grad, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)


def test_rate_one_virclass_is_the_full_softmax_over_w_and_every_virtual_class():
    head = one_process(10, 8)
    x, u, y = leaf(6, 8, seed=2), leaf(4, 8, seed=3), torch.tensor([2, 2, 7, 0, 9, 4])
    logits, target = head.virclass(x, y, u)
    assert logits.shape == (6, 10 + 4) and torch.equal(target, y)
    head.cross_entropy(logits, target).backward()

    w, x_ref, u_ref = (t.detach().clone().requires_grad_() for t in (head.weight, x, u))
    ref = F.cross_entropy(virclass_logits(x_ref, y, w, u_ref, S, M), y)
    ref.backward()
    assert abs(F.cross_entropy(logits, target).item() - ref.item()) < 1e-6
    for got, want in ((head.weight, w), (x, x_ref), (u, u_ref)):
        assert torch.allclose(got.grad, want.grad, atol=1e-6)


def test_rate_one_virinstance_is_the_full_softmax_with_targets_on_own_virtual_class():
    head = one_process(10, 8)
    centres = leaf(5, 8, seed=4)
    instances = leaf(2 * 3, 8, seed=5)              # gen_num 2, sources centres[1:4]
    logits, target = head.virinstance(instances, centres, gen_num=2, source_offset=1)
    # own virtual class of source i is column C + offset + i, sample-major
    assert target.tolist() == [11, 12, 13, 11, 12, 13]
    head.cross_entropy(logits, target).backward()

    w, inst_ref = head.weight.detach().clone().requires_grad_(), instances.detach().clone().requires_grad_()
    ref_logits, ref_target = virinstance_logits(inst_ref, w, centres, 2, S, M, source_offset=1)
    F.cross_entropy(ref_logits, ref_target).backward()
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    assert torch.allclose(head.weight.grad, w.grad, atol=1e-6)
    assert torch.allclose(instances.grad, inst_ref.grad, atol=1e-6)
    assert centres.grad is None                       # the centres are fixed targets (W_all_fix)


def test_one_process_starts_from_arcface_heads_w_and_drops_out_the_same_features():
    torch.manual_seed(7)
    arc = ArcFaceHead(50, 16, s=S, m=M, dropout=0.5).train()
    torch.manual_seed(7)
    pfc = PartialFCHead(50, 16, s=S, m=M, dropout=0.5).train()
    assert torch.equal(arc.weight, pfc.weight)
    x, y = torch.randn(4, 16), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(8)
    want = arc(x, y)
    torch.manual_seed(8)
    got, _ = pfc(x, y)                                 # r = 1 draws nothing but the dropout
    assert torch.equal(got, want)


def test_shards_start_from_distinct_centres_on_every_rank_and_repeat_from_the_seed():
    def shard(rank, seed):
        torch.manual_seed(seed)
        return PartialFCHead(10, 4, ctx=DistributedContext(torch.device("cpu"), rank, 2)).weight.detach()

    bound = math.sqrt(6 / (10 + 4))                    # Xavier-uniform over the full (10, 4) W
    assert not torch.equal(shard(0, seed=3), shard(1, seed=3))   # ranks are seeded alike
    assert torch.equal(shard(1, seed=3), shard(1, seed=3))
    assert all(w.abs().max() <= bound for w in (shard(0, 3), shard(1, 3)))


# ---------------------------------------------------------------- r < 1: what is sampled


def test_sampling_keeps_every_positive_and_r_times_c_classes():
    torch.manual_seed(0)
    head = one_process(1000, 8, sample_rate=0.1)
    y = torch.tensor([5, 999, 5, 0, 512, 77, 3, 640])
    logits, target = head(leaf(8, 8, seed=6), y)
    sampled = head.sampled_classes()
    assert logits.shape == (8, 100)                   # 0.1 * 1000 columns, not 1000
    assert sampled.numel() == 100 and sampled.unique().numel() == 100
    assert set(y.tolist()) <= set(sampled.tolist())
    assert torch.equal(sampled[target], y)             # each target column is its own class


def test_positives_beyond_the_sample_size_are_all_kept_and_nothing_else():
    head = one_process(100, 8, sample_rate=0.05)       # 5 classes per call...
    y = torch.arange(0, 96, 8)                         # ... but 12 positives
    logits, _ = head(leaf(12, 8, seed=7), y)
    assert logits.shape == (12, 12)
    assert head.sampled_classes().tolist() == y.tolist()


def test_every_virtual_class_is_a_column_after_the_sampled_classes():
    torch.manual_seed(1)
    head = one_process(1000, 8, sample_rate=0.1, s=1.0, m=0.0)
    x, u, y = leaf(4, 8, seed=8), leaf(6, 8, seed=9), torch.tensor([1, 2, 3, 4])
    logits, _ = head.virclass(x, y, u)
    assert logits.shape == (4, 100 + 6)
    # the last U columns are the cosines to the unlabeled features, in order
    assert torch.allclose(logits[:, 100:], unit(x) @ unit(u).t(), atol=1e-6)


def test_remapped_targets_point_at_the_true_class_centre():
    torch.manual_seed(2)
    head = one_process(1000, 8, sample_rate=0.1, s=1.0, m=0.0)
    x, u, y = leaf(5, 8, seed=10), leaf(3, 8, seed=11), torch.tensor([900, 4, 333, 4, 12])
    logits, target = head.virclass(x, y, u)
    w = head.weight.detach()
    true_cos = (unit(x) * unit(w[y])).sum(1)           # cos(x_i, W_{y_i}), worked out directly
    assert torch.allclose(logits[torch.arange(5), target], true_cos, atol=1e-6)

    instances = leaf(2 * 2, 8, seed=12)                # gen_num 2, sources u[1], u[2]
    logits, target = head.virinstance(instances, u, gen_num=2, source_offset=1)
    own = u[[1, 2, 1, 2]].detach()
    assert torch.allclose(logits[torch.arange(4), target], (unit(instances) * unit(own)).sum(1), atol=1e-6)
    assert (target >= logits.shape[1] - 3).all()       # targets are virtual columns


def test_w_rows_outside_the_sample_get_no_gradient():
    torch.manual_seed(3)
    head = one_process(1000, 8, sample_rate=0.1)
    logits, target = head.virclass(leaf(8, 8, seed=13), torch.arange(8) * 100, leaf(2, 8, seed=14))
    head.cross_entropy(logits, target).backward()
    sampled = torch.zeros(1000, dtype=torch.bool)
    sampled[head.sampled_classes()] = True
    row_has_grad = head.weight.grad.abs().sum(1) > 0
    assert not row_has_grad[~sampled].any()
    assert row_has_grad[sampled].all()


def test_sampling_repeats_from_the_same_seed():
    head = one_process(1000, 8, sample_rate=0.1)
    x, y = leaf(4, 8, seed=15), torch.tensor([1, 2, 3, 4])
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        head(x, y)
        draws.append(head.sampled_classes())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_no_batch_by_classes_tensor_is_kept_for_backward_when_sampling():
    head = one_process(2000, 8, sample_rate=0.1)
    x, y = leaf(16, 8, seed=16), torch.arange(16)
    biggest = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: biggest.append(t.numel()) or t, lambda t: t):
        head.cross_entropy(*head(x, y))
    params = head.weight.numel()
    # the largest activation saved is (16, 200) logits; the full (16, 2000) never exists
    assert max(n for n in biggest if n != params) == 16 * 200


def test_sample_rate_must_be_in_0_1():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sample_rate"):
            one_process(10, 4, sample_rate=bad)


# ---------------------------------------------------------------- shards and checkpoints


def test_shards_are_contiguous_blocks_differing_by_at_most_one_class():
    assert [shard_range(11, k, 3) for k in range(3)] == [(0, 4), (4, 8), (8, 11)]
    assert [shard_range(10, k, 2) for k in range(2)] == [(0, 5), (5, 10)]
    with pytest.raises(ValueError, match="3 ranks"):
        shard_range(2, 0, 3)


def test_a_full_w_from_one_rank_loads_into_two_shards_and_back(tmp_path):
    saved = one_process(11, 4).full_state_dict()
    torch.save(saved, tmp_path / "head.pt")
    full = torch.load(tmp_path / "head.pt")["weight"]
    shards = []
    for rank in range(2):
        head = PartialFCHead(11, 4, ctx=DistributedContext(torch.device("cpu"), rank, 2))
        head.load_full_state_dict(torch.load(tmp_path / "head.pt"))
        assert head.state_dict()["weight"].shape == ((6, 4) if rank == 0 else (5, 4))
        assert torch.equal(head.weight, shard_rows(full, rank, 2))
        shards.append(head.weight.detach())
    back = one_process(11, 4)
    back.load_full_state_dict({"weight": torch.cat(shards)})
    assert torch.equal(back.full_state_dict()["weight"], full)
    # the saved head state is ArcFaceHead's: same key, same shape
    arc = ArcFaceHead(11, 4)
    load_module_state(arc, saved, "head", "head.pt")
    assert torch.equal(arc.weight, full)


def test_a_sampled_head_loads_a_full_softmax_checkpoint():
    full = one_process(100, 4, sample_rate=1.0)
    sampled = one_process(100, 4, sample_rate=0.1)
    sampled.load_full_state_dict(full.full_state_dict())
    assert torch.equal(sampled.weight, full.weight)


def test_a_checkpoint_of_another_shape_is_refused_by_name():
    head = one_process(11, 4)
    with pytest.raises(CheckpointError, match=r"run/best.pt.*\(12, 4\).*\(11, 4\)"):
        head.load_full_state_dict({"weight": torch.zeros(12, 4)}, "run/best.pt")
    with pytest.raises(CheckpointError, match="exactly 'weight'"):
        head.load_full_state_dict({"weight": torch.zeros(11, 4), "bias": torch.zeros(11)})


# ---------------------------------------------------------------- two gloo ranks = one process

C, D, WORLD = 11, 8, 2                  # shards of 6 and 5 classes
B_LOCAL, U_LOCAL, GEN = 3, 2, 2
SOURCES = (2, 1)                        # kept VirInstance sources per rank: sizes may differ


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_worker(rank, port, inputs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ctx = DistributedContext(torch.device("cpu"), rank, WORLD)
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        y = inputs["y"][rows]
        out = {}

        def head(rate=1.0):
            h = PartialFCHead(C, D, s=S, m=M, dropout=0.0, sample_rate=rate, ctx=ctx)
            h.load_full_state_dict({"weight": inputs["w"]})
            return h

        h, x = head(), inputs["x"][rows].clone().requires_grad_()
        loss = h.cross_entropy(*h(x, y))
        loss.backward()
        out["plain"] = (loss.detach(), x.grad, h.weight.grad)

        h, x = head(), inputs["x"][rows].clone().requires_grad_()
        u = inputs["u"][rank * U_LOCAL:(rank + 1) * U_LOCAL].clone().requires_grad_()
        loss = h.cross_entropy(*h.virclass(x, y, ctx.all_gather_with_grad(u)))
        loss.backward()
        out["virclass"] = (loss.detach(), x.grad, u.grad, h.weight.grad)

        h = head()
        first = sum(SOURCES[:rank])
        inst = torch.cat([inputs["inst"][d * sum(SOURCES) + first:][:SOURCES[rank]] for d in range(GEN)])
        inst = inst.clone().requires_grad_()
        loss = h.cross_entropy(*h.virinstance(inst, inputs["u"], GEN, source_offset=first))
        loss.backward()
        out["virinstance"] = (loss.detach(), inst.grad, h.weight.grad)

        h = head()
        centres = h.class_centres(y)
        (centres * inputs["r"][rows]).sum().backward()
        out["class_centres"] = (centres.detach(), h.weight.grad)

        # The optimiser's W state goes into a checkpoint whole (C, D) and comes back as shards.
        # W is not the first parameter, and the other one's state is left as it is.
        h, x = head(), inputs["x"][rows].clone()
        other = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.SGD([other, h.weight], lr=0.1, momentum=0.9)
        ((other ** 2).sum() + h.cross_entropy(*h(x, y))).backward()
        optimizer.step()
        saved = full_optimizer_state(optimizer, h, ctx)
        fresh = head()
        fresh_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2)), fresh.weight], lr=0.1, momentum=0.9)
        load_optimizer_state(fresh_optimizer, saved, fresh, ctx)
        out["optimizer"] = ({k: v["momentum_buffer"] for k, v in saved["state"].items()},
                            {k: v["momentum_buffer"] for k, v in fresh_optimizer.state_dict()["state"].items()})

        out["overlap"] = head().overlap_keep_mask(inputs["u"], inputs["threshold"])
        out["full_w"] = head().full_state_dict()["weight"]

        torch.manual_seed(100 + rank)              # ranks sample their shards independently
        h, x = head(0.5), inputs["x"][rows].clone().requires_grad_()
        loss = h.cross_entropy(*h.virclass(x, y, inputs["u"]))
        loss.backward()
        out["sampled"] = (loss.detach(), h.sampled_classes(), h.weight.grad)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()              # neither rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_over_the_full_w(tmp_path):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(C, D, generator=g), torch.randn(WORLD * B_LOCAL, D, generator=g)
    u = torch.randn(WORLD * U_LOCAL, D, generator=g)
    inst = torch.randn(GEN * sum(SOURCES), D, generator=g)    # sample-major over all 3 sources
    y = torch.tensor([0, 5, 6, 10, 5, 2])                       # both shards, both ranks
    r = torch.randn(WORLD * B_LOCAL, D, generator=g)
    peaks = torch.softmax(S * unit(u) @ unit(w).t(), dim=1).amax(1).sort().values
    threshold = float(peaks[1:3].mean())                      # keeps 2 of 4
    inputs = {"w": w, "x": x, "u": u, "inst": inst, "y": y, "r": r, "threshold": threshold}
    mp.spawn(_two_rank_worker, args=(_free_port(), inputs, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(WORLD)]
    shard = [slice(*shard_range(C, k, WORLD)) for k in range(WORLD)]
    local = [slice(k * B_LOCAL, (k + 1) * B_LOCAL) for k in range(WORLD)]

    def reference(loss_of, *tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        loss = loss_of(*leaves)
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    # Feature gradients follow DDP's convention (as ArcFaceHead's steps do): rank k leaves
    # WORLD x its rows of the one-process gradient, and DDP's average brings it back to 1x.
    loss, (dw, dx) = reference(lambda w, x: F.cross_entropy(
        arcface_margin_logits(F.normalize(x, dim=1) @ F.normalize(w, dim=1).t(), y, S, M), y), w, x)
    for k, (got_loss, got_dx, got_dw) in enumerate(o["plain"] for o in ranks):
        assert math.isclose(got_loss.item(), loss.item(), rel_tol=1e-6, abs_tol=1e-6)
        assert torch.allclose(got_dw, dw[shard[k]], atol=1e-6)             # exactly its rows
        assert torch.allclose(got_dx, WORLD * dx[local[k]], atol=1e-6)

    loss, (dw, dx, du) = reference(lambda w, x, u: F.cross_entropy(virclass_logits(x, y, w, u, S, M), y), w, x, u)
    for k, (got_loss, got_dx, got_du, got_dw) in enumerate(o["virclass"] for o in ranks):
        assert math.isclose(got_loss.item(), loss.item(), rel_tol=1e-6, abs_tol=1e-6)
        assert torch.allclose(got_dw, dw[shard[k]], atol=1e-6)
        assert torch.allclose(got_dx, WORLD * dx[local[k]], atol=1e-6)
        assert torch.allclose(got_du, WORLD * du[k * U_LOCAL:(k + 1) * U_LOCAL], atol=1e-6)

    # VirInstance: rank 0 draws from sources u[0:2], rank 1 from u[2:3]; the one-process loss is
    # the mean over every rank's instances, in rank order.
    firsts = [sum(SOURCES[:k]) for k in range(WORLD)]
    per_rank = [torch.cat([inst[d * sum(SOURCES) + first:][:n] for d in range(GEN)])
                for first, n in zip(firsts, SOURCES)]

    def vi_loss(w, *instances):
        parts = [virinstance_logits(i, w, u, GEN, S, M, source_offset=first)
                 for i, first in zip(instances, firsts)]
        return F.cross_entropy(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    loss, (dw, *dinst) = reference(vi_loss, w, *per_rank)
    for k, (got_loss, got_dinst, got_dw) in enumerate(o["virinstance"] for o in ranks):
        assert math.isclose(got_loss.item(), loss.item(), rel_tol=1e-6, abs_tol=1e-6)
        assert torch.allclose(got_dw, dw[shard[k]], atol=1e-6)
        assert torch.allclose(got_dinst, WORLD * dinst[k], atol=1e-6)

    # W_y for the generator: each rank's rows, and the gradient of the ranks' mean loss.
    _, (dw,) = reference(lambda w: sum((w[y[local[k]]] * r[local[k]]).sum() for k in range(WORLD)) / WORLD, w)
    for k, (centres, got_dw) in enumerate(o["class_centres"] for o in ranks):
        assert torch.equal(centres, w[y[local[k]]])
        assert torch.allclose(got_dw, dw[shard[k]], atol=1e-6)

    # SGD's first momentum buffer is the gradient: W's whole in the checkpoint on every rank
    # (the plain loss's full dW), each rank's rows once loaded; the other parameter's untouched.
    loss, (dw,) = reference(lambda w: F.cross_entropy(
        arcface_margin_logits(F.normalize(x, dim=1) @ F.normalize(w, dim=1).t(), y, S, M), y), w)
    for k, (saved, loaded) in enumerate(o["optimizer"] for o in ranks):
        assert sorted(saved) == [0, 1] and torch.equal(saved[0], torch.full((2,), 2.0))
        assert torch.allclose(saved[1], dw, atol=1e-6)
        assert torch.equal(loaded[0], saved[0]) and torch.equal(loaded[1], saved[1][shard[k]])

    keep = overlap_keep_mask(u, w, S, threshold)
    assert keep.sum() == 2
    for o in ranks:
        assert torch.equal(o["overlap"], keep)
        assert torch.equal(o["full_w"], w)

    # r = 0.5: the one-process softmax over the union of the ranks' samples (+ the virtual classes).
    union = torch.cat([o["sampled"][1] for o in ranks])
    assert set(y.tolist()) <= set(union.tolist())
    # 0.5 x 6 = 3 and 0.5 x 5 = 2.5 -> 3 classes per shard, each with its 2 positives in y
    assert [o["sampled"][1].numel() for o in ranks] == [3, 3]
    column = {int(c): i for i, c in enumerate(union)}
    y_union = torch.tensor([column[int(c)] for c in y])
    loss, (dw_union,) = reference(lambda wu: F.cross_entropy(virclass_logits(x, y_union, wu, u, S, M), y_union),
                                  w[union])
    dw = torch.zeros_like(w).index_add_(0, union, dw_union)
    for k, (got_loss, _, got_dw) in enumerate(o["sampled"] for o in ranks):
        assert math.isclose(got_loss.item(), loss.item(), rel_tol=1e-6, abs_tol=1e-6)
        assert torch.allclose(got_dw, dw[shard[k]], atol=1e-6)


def test_a_ranks_margin_applies_to_the_rows_whose_target_it_holds_and_leaves_the_others():
    from virface.partial_fc import margin_logits

    cos = torch.tensor([[0.5, 0.2, -0.95, 0.1], [0.3, 0.4, 0.0, -0.2], [0.9, -0.1, 0.2, 0.6],
                        [-0.5, 0.7, 0.1, 0.0], [0.2, 0.2, 0.3, -0.92]])
    target = torch.tensor([2, -1, 0, -1, 3])         # rows 1 and 3: their targets are on another rank
    got = margin_logits(cos, target, s=4.0, m=0.5)
    here = target >= 0
    full = arcface_margin_logits(cos[here], target[here], s=4.0, m=0.5)
    assert torch.allclose(got[here], full, atol=1e-6)             # the fallback past pi included (rows 0, 4)
    assert torch.allclose(got[~here], 4.0 * cos[~here])
    assert torch.allclose(margin_logits(cos[here], target[here], 4.0, 0.5), full)


# ---------------------------------------------------------------- one process: what the steps call

def test_one_process_losses_are_the_cross_entropy_of_their_logits_with_the_plain_heads_defaults():
    h = one_process(5, 4)
    x, y, centres = leaf(3, 4, seed=1), torch.tensor([0, 3, 4]), leaf(2, 4, seed=2)
    assert (PartialFCHead(5, 4).s, PartialFCHead(5, 4).m) == (32.0, 0.5)
    assert torch.allclose(h.arcface_loss(x, y), F.cross_entropy(*h(x, y)))
    assert torch.allclose(h.virclass_loss(x, y, centres), F.cross_entropy(*h.virclass(x, y, centres)))
    # VirInstance: own virtual class C + source, sample-major, offset 0 and detached centres by default.
    for gen_num in (1, 2):
        instances = leaf(2 * gen_num, 4, seed=3)
        logits, target = h.virinstance(instances, centres, gen_num)
        assert target.tolist() == [5, 6] * gen_num
        expected, _ = virinstance_logits(instances, h.weight, centres, gen_num, S, M)
        assert torch.allclose(logits, expected, atol=1e-6)
        loss = h.virinstance_loss(instances, centres, gen_num)
        assert loss.item() > 0 and torch.allclose(loss, F.cross_entropy(logits, target))
        loss.backward()
        assert centres.grad is None and instances.grad is not None
    assert h.virinstance_loss(torch.zeros(0, 4), centres, gen_num=2).item() == 0.0
    assert h.virinstance_loss(leaf(1, 4, seed=5), centres, gen_num=1).item() > 0     # one instance is not none
    # centre_grad: L_vi reaches the virtual centres, through the logits and through the loss.
    attached = leaf(2, 4, seed=2)
    h.cross_entropy(*h.virinstance(leaf(2, 4, seed=3), attached, 1, centre_grad=True)).backward()
    assert attached.grad is not None and attached.grad.abs().sum() > 0
    attached = leaf(2, 4, seed=2)
    h.virinstance_loss(leaf(2, 4, seed=3), attached, 1, centre_grad=True).backward()
    assert attached.grad is not None and attached.grad.abs().sum() > 0


def test_one_process_optimizer_state_is_saved_and_loaded_as_it_is():
    h = one_process(5, 4)
    optimizer = torch.optim.SGD(h.parameters(), lr=0.1, momentum=0.9)
    h.arcface_loss(leaf(3, 4, seed=1), torch.tensor([0, 3, 4])).backward()
    optimizer.step()
    saved = full_optimizer_state(optimizer, h, h.ctx)
    assert torch.equal(saved["state"][0]["momentum_buffer"], h.weight.grad)
    fresh = one_process(5, 4)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    load_optimizer_state(fresh_optimizer, saved, fresh, fresh.ctx)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["momentum_buffer"], h.weight.grad)


def test_the_sampled_classes_are_all_of_them_until_a_sampled_call_and_the_repr_names_the_shape():
    h = one_process(5, 4, sample_rate=0.4)
    assert h.sampled_classes().tolist() == [0, 1, 2, 3, 4]
    torch.manual_seed(0)
    h(leaf(1, 4, seed=1), torch.tensor([3]))
    sampled = h.sampled_classes().tolist()
    assert len(sampled) == 2 and 3 in sampled and sampled == sorted(sampled)
    assert "num_classes=5, shard=[0, 5), feat_len=4, s=8.0, m=0.5, sample_rate=0.4" in repr(h)


def test_one_class_per_rank_is_a_shard_and_fewer_is_refused():
    assert [shard_range(2, k, 2) for k in range(2)] == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="num_classes=1 cannot be sharded over 2 ranks"):
        shard_range(1, 0, 2)


def test_a_batch_of_one_row_has_its_cross_entropy_and_of_none_a_zero_loss_that_backpropagates():
    from virface.partial_fc import sharded_cross_entropy

    ctx = DistributedContext(torch.device("cpu"))
    logits = leaf(1, 3, seed=4)
    assert torch.allclose(sharded_cross_entropy(logits, torch.tensor([2]), ctx),
                          F.cross_entropy(logits, torch.tensor([2])))
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = sharded_cross_entropy(empty, torch.zeros(0, dtype=torch.long), ctx)
    assert loss.item() == 0.0
    loss.backward()
    assert empty.grad is not None


def test_a_ranks_margin_clamps_cosines_a_rounding_error_put_past_one():
    from virface.partial_fc import margin_logits

    cos = torch.tensor([[1.0 + 1e-6, 0.2], [-1.0 - 1e-6, 0.3]])
    logits = margin_logits(cos, torch.tensor([0, 0]), S, M)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0, 0], torch.tensor(S * math.cos(M)))            # cos(0 + m)
    torch.testing.assert_close(logits[1, 0], torch.tensor(S * (-1.0 - M * math.sin(M))))   # past pi - m
    assert torch.allclose(logits[:, 1], S * cos[:, 1])


def test_a_head_state_saved_under_data_parallel_loads_and_a_wrong_one_names_its_source():
    w = torch.randn(5, 4)
    h = one_process(5, 4)
    h.load_full_state_dict({"module.weight": w})
    assert torch.equal(h.weight.detach(), w)
    with pytest.raises(CheckpointError, match=r"^checkpoint: the head state should hold exactly 'weight'"):
        h.load_full_state_dict({"weight": w, "bias": w[0]})
    with pytest.raises(CheckpointError, match=r"^run/best\.pt: the head's weight is \(4, 4\)"):
        h.load_full_state_dict({"weight": w[:4]}, source="run/best.pt")
