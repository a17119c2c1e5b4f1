"""Partial FC: the ArcFace head over a sample of the classes, with W sharded over the ranks.

What insightface's arcface_torch calls Partial FC (v2, https://arxiv.org/abs/2203.15565), in this
codebase's terms, with VirFace's virtual classes added:

- **Sampling** (``sample_rate`` r in (0, 1]). Each call, the logits are computed for the batch's
  positive classes plus a uniformly random sample of the others, about ``r * C`` classes in all
  (all positives, however many). W's rows outside the sample get no logits, no gradient and cost
  nothing but a (C,) vector of random scores: no (B, C) matrix is ever built when r < 1.
  r = 1 draws no random numbers and is exactly the full ArcFace softmax.
- **Virtual classes.** Every virtual-class centre (VirClass: the batch's unlabeled features,
  gathered over ranks) is always a column, appended after the sampled labeled classes; the
  targets come back remapped to the columns of the returned logits.
- **Sharding** (world_size > 1). Rank k owns the contiguous block of classes
  :func:`shard_range` gives (sizes differ by at most 1) and samples within it on its own, from its
  own random stream, as arcface_torch does: the union is a uniform sample of about r * C classes
  with every positive in it, and nothing needs to agree between ranks. The features (and labels)
  are all-gathered, each rank computes the logits of its shard for the whole gathered batch, and
  :meth:`PartialFCHead.cross_entropy` reduces the softmax over ranks (a max and two sums), so the
  loss is the one-process loss of the gathered batch, identical on every rank.
  The **virtual classes are carried by rank 0's shard**: its logits end with them, counted once;
  the other ranks compute none (they keep the centres in their graph with a zero gradient only so
  that the all-gather that made the centres runs its backward on every rank).

Gradient convention under data parallelism: the same as the ArcFace steps'. DDP *averages* the
backbone's (and the generator's) gradient over ranks, so what each rank leaves on a replicated
input (features, instances, virtual-class centres) is ``world_size`` times its share of the
gradient of the global loss; after DDP's average the backbone gets exactly the one-process
gradient. W's shards are not replicated: each rank's shard gets exactly its rows of the
one-process gradient, and must **not** be averaged over ranks.

Checkpoints always hold the full W, under the key and shape :class:`~virface.heads.ArcFaceHead`
uses ("weight", (C, D)): :meth:`PartialFCHead.full_state_dict` gathers it and
:meth:`PartialFCHead.load_full_state_dict` slices a rank's shard out of it, so a checkpoint loads
whatever the sample rate (sampling is per call, not state) and the number of ranks.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from virface.distributed import DistributedContext
from virface.errors import CheckpointError
from virface.heads import arcface_margin_logits

# The rank whose shard carries the virtual classes.
VIRTUAL_CLASS_RANK = 0


# ---------------------------------------------------------------- shards of W


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes [start, end) owned by ``rank``: contiguous blocks, the first ``C % world_size``
    ranks holding one class more."""
    if num_classes < world_size:
        raise ValueError(f"num_classes={num_classes} cannot be sharded over {world_size} ranks "
                         f"(every rank needs at least one class)")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def shard_rows(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``rank``'s rows of a (C, ...) tensor (a full W, or its optimiser state), as a copy."""
    start, end = shard_range(full.shape[0], rank, world_size)
    return full[start:end].clone()


def gather_shards(shard: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """The full (C, ...) tensor from every rank's shard, on every rank. A collective: every rank
    calls it (for a checkpoint, before rank 0 writes it). In one process, the shard itself
    (detached, as ``state_dict()`` gives it)."""
    if not ctx.is_distributed:
        return shard.detach()
    return _GatherRows.apply(shard.detach(), _row_counts(shard.shape[0], shard.device, ctx), ctx, 1.0)


# ---------------------------------------------------------------- collectives with gradients


def _row_counts(n: int, device: torch.device, ctx: DistributedContext) -> list[int]:
    """Every rank's number of rows, in rank order."""
    if not ctx.is_distributed:
        return [n]
    mine = torch.tensor([n], device=device)
    counts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(counts, mine)
    return [int(c) for c in counts]


class _GatherRows(torch.autograd.Function):
    """All-gather of (n_k, ...) tensors whose n_k may differ per rank (VirInstance's kept
    sources do). Backward: each rank gets the sum over ranks of the gradient of its own rows,
    times ``grad_scale`` (world_size for a replicated input, see the module's gradient
    convention). Gloo has no reduce-scatter; an all-reduce of the (small) gathered gradient
    works on every backend."""

    @staticmethod
    def forward(fctx, x, counts, ctx, grad_scale):
        fctx.counts, fctx.rank, fctx.grad_scale = counts, ctx.rank, grad_scale
        width = max(counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(fctx, grad):
        counts = fctx.counts
        padded = grad.new_zeros((len(counts), max(counts), *grad.shape[1:]))
        for k, rows in enumerate(grad.split(counts)):
            padded[k, :counts[k]] = rows
        dist.all_reduce(padded)
        return padded[fctx.rank, :counts[fctx.rank]] * fctx.grad_scale, None, None, None


def _gather(x: torch.Tensor, ctx: DistributedContext, grad_scale: float = 1.0) -> torch.Tensor:
    if not ctx.is_distributed:
        return x
    return _GatherRows.apply(x, _row_counts(x.shape[0], x.device, ctx), ctx, grad_scale)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(fctx, x, scale):
        fctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(fctx, grad):
        return grad * fctx.scale, None


class _KeepInGraph(torch.autograd.Function):
    """``x`` unchanged, with ``passenger`` in its graph and a zero gradient to it, so that the
    collectives in ``passenger``'s graph run their backward on this rank too."""

    @staticmethod
    def forward(fctx, x, passenger):
        fctx.passenger_shape = passenger.shape
        return x.view_as(x)

    @staticmethod
    def backward(fctx, grad):
        return grad, grad.new_zeros(fctx.passenger_shape)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of per-rank contributions to a replicated tensor that each rank then uses
    in its own, local loss. Backward: the sum of every rank's gradient, divided by world_size (the
    objective is the mean of the ranks' local losses, as DDP's averaging makes it)."""

    @staticmethod
    def forward(fctx, x, ctx):
        fctx.world_size = ctx.world_size
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(fctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / fctx.world_size, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of (N, K_k) logits whose columns are spread over the ranks.

    ``target``: (N,) long, the column on this rank, or -1 where the row's target lives on another
    rank. The row maxima and the sums of exponentials (and the target logits) are all-reduced,
    so every rank returns the loss of the whole (N, sum K_k) softmax; backward gives this rank's
    columns their exact gradient, (softmax - onehot) / N.
    """

    @staticmethod
    def forward(fctx, logits, target, ctx):
        logits = logits.float()
        n = logits.shape[0]
        row_max = logits.max(dim=1, keepdim=True).values
        _all_reduce(row_max, ctx, dist.ReduceOp.MAX)
        probs = (logits - row_max).exp_()
        denom = probs.sum(dim=1, keepdim=True)
        _all_reduce(denom, ctx)
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        picked = logits.new_zeros(n)
        picked[rows] = logits[rows, cols] - row_max[rows, 0]
        _all_reduce(picked, ctx)
        probs.div_(denom)
        fctx.save_for_backward(probs, rows, cols)
        return (denom.squeeze(1).log() - picked).mean()

    @staticmethod
    def backward(fctx, grad_loss):
        # In place on the saved probabilities: a second backward through this graph would fail
        # autograd's version check rather than compute a wrong gradient.
        probs, rows, cols = fctx.saved_tensors
        probs[rows, cols] -= 1.0
        return probs.mul_(grad_loss / probs.shape[0]), None, None


def _all_reduce(x: torch.Tensor, ctx: DistributedContext, op=dist.ReduceOp.SUM) -> None:
    if ctx.is_distributed:
        dist.all_reduce(x, op=op)


def sharded_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Mean cross-entropy over the gathered batch, the softmax spanning every rank's columns.

    logits: (N, K_k) this rank's columns; target: (N,) long, the target's column here or -1 when
    it is another rank's. A collective when ``ctx`` is distributed (every rank calls it, with the
    same N); in one process it is ``F.cross_entropy``. A batch of no rows has loss 0.
    """
    if target.numel() == 0:
        return logits.sum() * 0.0           # keeps the graph, so every rank's backward runs
    if not ctx.is_distributed:
        return F.cross_entropy(logits, target)
    return _ShardedCrossEntropy.apply(logits, target, ctx)


# ---------------------------------------------------------------- sampling and margins


def sample_classes(positives: torch.Tensor, num_local: int, num_sample: int) -> torch.Tensor:
    """Sorted local class ids: every positive, topped up with uniformly random others to
    ``num_sample`` (or the positives alone, when they are that many already).

    positives: (P,) long, sorted, unique, in [0, num_local). Draws ``num_local`` uniform numbers
    from torch's generator on ``positives``' device (seed it for a reproducible run).
    """
    if positives.numel() >= num_sample:
        return positives
    score = torch.rand(num_local, device=positives.device)
    score[positives] = 2.0                  # above every draw: the positives are always kept
    return score.topk(num_sample, sorted=False).indices.sort().values


def margin_logits(cos: torch.Tensor, target: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """:func:`~virface.heads.arcface_margin_logits` for a rank's columns, where ``target`` is -1
    for rows whose target column is on another rank (those rows get no margin here).

    cos: (N, K) float; target: (N,) long in [-1, K). Returns (N, K).
    """
    here = target >= 0
    if bool(here.all()):
        return arcface_margin_logits(cos, target, s, m)
    cos = cos.clamp(-1.0, 1.0)
    col = target.clamp_min(0)[:, None]
    cos_t = cos.gather(1, col)
    sin_t = (1.0 - cos_t * cos_t).clamp_min(0.0).sqrt()
    phi = cos_t * math.cos(m) - sin_t * math.sin(m)
    phi = torch.where(cos_t > math.cos(math.pi - m), phi, cos_t - m * math.sin(m))
    # Rows without a target here write their own cosine back into column 0: no change.
    return s * cos.scatter(1, col, torch.where(here[:, None], phi, cos_t))


# ---------------------------------------------------------------- the head


class PartialFCHead(nn.Module):
    """The ArcFace head with sampled, sharded class weights; VirClass and VirInstance on top.

    Holds this rank's shard of W, (num_local, feat_len) for classes [class_start, class_end),
    initialised as ArcFaceHead initialises the full W (Xavier-uniform over (C, D); in one process
    the very same values from the same seed; sharded, other values, distinct on every rank).
    ``state_dict()`` is the shard; checkpoints use :meth:`full_state_dict` /
    :meth:`load_full_state_dict`.

    The logits methods return ``(logits, target)``: logits (N, K) for this rank's K columns (the
    sampled classes of its shard, in class order, then, on rank 0, the U virtual classes), and
    target (N,) long, each row's column, or -1 where it is another rank's. N is the batch gathered
    over ranks. In one process ``F.cross_entropy(logits, target)`` is the loss; in general call
    :meth:`cross_entropy`, on every rank. When distributed, the logits methods,
    :meth:`cross_entropy`, :meth:`class_centres`, :meth:`overlap_keep_mask` and
    :meth:`full_state_dict` are collectives: every rank calls them, in the same order.
    """

    def __init__(self, num_classes: int, feat_len: int, s: float = 32.0, m: float = 0.5,
                 dropout: float = 0.5, sample_rate: float = 1.0, ctx: DistributedContext | None = None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.ctx = ctx or DistributedContext(torch.device("cpu"))
        self.total_classes = num_classes
        self.class_start, self.class_end = shard_range(num_classes, self.ctx.rank, self.ctx.world_size)
        self.weight = nn.Parameter(torch.empty(self.num_local, feat_len))
        # Xavier-uniform of the full (C, D) matrix, drawn for the shard only. Every rank is
        # seeded alike, so sharded, each rank draws from its own generator (forked off the common
        # stream with its rank): otherwise row i of every shard would start as the same centre.
        bound = math.sqrt(3.0) * math.sqrt(2.0 / float(num_classes + feat_len))
        generator = None
        if self.ctx.is_distributed:
            fork = int(torch.randint(2**62, ()))
            generator = torch.Generator().manual_seed(fork + self.ctx.rank)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
        self.s, self.m = s, m
        self.sample_rate = sample_rate
        self.dropout = nn.Dropout(dropout)
        self.sampled_index: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        """All classes, over every shard (ArcFaceHead's ``num_classes``)."""
        return self.total_classes

    @property
    def num_local(self) -> int:
        return self.class_end - self.class_start

    @property
    def num_sample(self) -> int:
        """Classes this shard samples per call, positives included (more if positives are more)."""
        return min(self.num_local, max(1, math.floor(self.sample_rate * self.num_local + 0.5)))

    @property
    def carries_virtual_classes(self) -> bool:
        return self.ctx.rank == VIRTUAL_CLASS_RANK

    def sampled_classes(self) -> torch.Tensor:
        """Global class ids of the labeled columns of the last logits, in column order."""
        if self.sampled_index is None:
            return torch.arange(self.class_start, self.class_end, device=self.weight.device)
        return self.sampled_index + self.class_start

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, shard=[{self.class_start}, {self.class_end}), "
                f"feat_len={self.weight.shape[1]}, s={self.s}, m={self.m}, sample_rate={self.sample_rate}")

    # ------------------------------------------------------------ the three logits

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        # As ArcFaceHead.drop: p = 0 draws no random numbers.
        return self.dropout(x) if self.dropout.p > 0 else x

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ArcFace: (B, D) features of this rank (dropout applied here), labels (B,) in [0, C).
        Returns (logits, target) over the gathered batch, as the class docstring says."""
        feats, labels = self._gather_labeled(self.drop(x), labels)
        return self._logits(feats, labels)

    def virclass(self, x: torch.Tensor, labels: torch.Tensor,
                 centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VirClass: the labeled features (dropout applied) against the sampled classes and every
        virtual class. centres: (U, D) every rank's unlabeled features, identical on all ranks
        (``ctx.all_gather_with_grad``), not detached: L_vc reaches the backbone through them."""
        feats, labels = self._gather_labeled(self.drop(x), labels)
        return self._logits(feats, labels, centres=centres)

    def virinstance(self, instances: torch.Tensor, centres: torch.Tensor, gen_num: int,
                    source_offset: int = 0, centre_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """VirInstance: this rank's generated instances, (gen_num * n, D) sample-major, drawn from
        centres[source_offset : source_offset + n], each classified into its own virtual class
        (margin on it) against the sampled classes and every centre (detached, as in
        :func:`~virface.heads.virinstance_logits`; attached with ``centre_grad``). n may differ per rank, and be 0; every rank
        still calls this."""
        n_sources = instances.shape[0] // max(gen_num, 1)
        own = source_offset + torch.arange(n_sources, device=instances.device)
        virtual_target = own.repeat(gen_num)
        feats = _gather(instances, self.ctx, grad_scale=float(self.ctx.world_size))
        virtual_target = _gather(virtual_target, self.ctx)
        labels = torch.full_like(virtual_target, -1)
        return self._logits(feats, labels, centres=centres if centre_grad else centres.detach(),
                            virtual_target=virtual_target)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of logits from this head, the softmax spanning every shard."""
        return sharded_cross_entropy(logits, target, self.ctx)

    # The losses the steps take, the same for every head (ArcFaceHead too).

    def arcface_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(*self(x, labels))

    def virclass_loss(self, x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(*self.virclass(x, labels, centres))

    def virinstance_loss(self, instances: torch.Tensor, centres: torch.Tensor, gen_num: int,
                         source_offset: int = 0, centre_grad: bool = False) -> torch.Tensor:
        """Called on every rank, also one with no instance (a collective when sharded)."""
        if instances.shape[0] == 0 and not self.ctx.is_distributed:
            return instances.new_zeros(())
        return self.cross_entropy(*self.virinstance(instances, centres, gen_num, source_offset, centre_grad))

    def averaged_parameters(self) -> list[nn.Parameter]:
        """None: each shard's gradient is already exact (see the module docstring)."""
        return []

    # ------------------------------------------------------------ what other losses need of W

    def class_centres(self, labels: torch.Tensor) -> torch.Tensor:
        """W's rows (not normalised) for this rank's labels: (B, D), what ``head.weight[labels]``
        is for ArcFaceHead (the generator's target W_y). Gradients reach the owning shards, as
        for a loss averaged over ranks."""
        if not self.ctx.is_distributed:
            return self.weight[labels]
        counts = _row_counts(labels.shape[0], labels.device, self.ctx)
        all_labels = _GatherRows.apply(labels, counts, self.ctx, 1.0)
        mine = ((all_labels >= self.class_start) & (all_labels < self.class_end)).nonzero().squeeze(1)
        rows = self.weight.new_zeros((all_labels.shape[0], self.weight.shape[1]))
        rows = rows.index_put((mine,), self.weight[all_labels[mine] - self.class_start])
        rows = _SumOverRanks.apply(rows, self.ctx)
        start = sum(counts[:self.ctx.rank])
        return rows[start:start + labels.shape[0]]

    @torch.no_grad()
    def overlap_keep_mask(self, u: torch.Tensor, threshold: float) -> torch.Tensor:
        """:func:`~virface.heads.overlap_keep_mask` over every class of every shard (no sampling:
        the filter asks about all labeled identities). u: (U, D), identical on all ranks."""
        logits = self.s * (F.normalize(u.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t())
        row_max = logits.max(dim=1, keepdim=True).values
        _all_reduce(row_max, self.ctx, dist.ReduceOp.MAX)
        denom = (logits - row_max).exp_().sum(dim=1)
        _all_reduce(denom, self.ctx)
        return denom.reciprocal() < threshold      # the softmax's peak is exp(0) / denom

    # ------------------------------------------------------------ checkpoints

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """{"weight": the full (C, D) W}, as ArcFaceHead's state_dict has it. A collective."""
        return {"weight": gather_shards(self.weight, self.ctx)}

    def load_full_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Load this rank's shard from a full head state (ArcFaceHead's or :meth:`full_state_dict`'s);
        anything else is a CheckpointError naming ``source``."""
        keys = sorted(k[len("module."):] if k.startswith("module.") else k for k in state)
        if keys != ["weight"]:
            raise CheckpointError(f"{source}: the head state should hold exactly 'weight', found {keys}")
        full = next(iter(state.values()))
        expected = (self.num_classes, self.weight.shape[1])
        if tuple(full.shape) != expected:
            raise CheckpointError(f"{source}: the head's weight is {tuple(full.shape)}, the model's "
                                  f"full W is {expected} (num_ids x feat_len)")
        with torch.no_grad():
            self.weight.copy_(full[self.class_start:self.class_end])

    # ------------------------------------------------------------ internals

    def _gather_labeled(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (_gather(x, self.ctx, grad_scale=float(self.ctx.world_size)),
                _gather(labels, self.ctx))

    def _logits(self, feats: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor | None = None,
                virtual_target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (N, D) and labels (N,) gathered (label -1: the target is a virtual class,
        ``virtual_target`` (N,) indexes ``centres``). Samples this shard, builds the columns."""
        here = (labels >= self.class_start) & (labels < self.class_end)
        local = torch.where(here, labels - self.class_start, torch.full_like(labels, -1))
        if self.sample_rate < 1.0:
            positives = local[here].unique()
            self.sampled_index = sample_classes(positives, self.num_local, self.num_sample)
            weight = self.weight[self.sampled_index]
            target = torch.where(here, torch.searchsorted(self.sampled_index, local.clamp_min(0)), local)
        else:
            self.sampled_index = None
            weight, target = self.weight, local
        class_centres = F.normalize(weight, dim=1)
        with_virtual = centres is not None and self.carries_virtual_classes
        if with_virtual:
            scale = float(self.ctx.world_size)     # a replicated input: see the module docstring
            virtual = F.normalize(_ScaleGrad.apply(centres, scale) if scale != 1.0 else centres, dim=1)
            class_centres = torch.cat([class_centres, virtual], dim=0)
            if virtual_target is not None:
                target = torch.where(virtual_target >= 0, weight.shape[0] + virtual_target, target)
        logits = margin_logits(F.normalize(feats, dim=1) @ class_centres.t(), target, self.s, self.m)
        if centres is not None and not with_virtual and centres.requires_grad:
            logits = _KeepInGraph.apply(logits, centres)
        return logits, target


# ---------------------------------------------------------------- optimiser state in checkpoints


def _weight_index(optimizer: torch.optim.Optimizer, weight: torch.Tensor) -> int | None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next((i for i, p in enumerate(params) if p is weight), None)


def full_optimizer_state(optimizer: torch.optim.Optimizer, head: nn.Module,
                         ctx: DistributedContext) -> dict[str, Any]:
    """``optimizer.state_dict()`` with a sharded head's W state gathered to (C, D), as a checkpoint
    holds it (so it resumes on any number of ranks). A collective when sharded."""
    state = optimizer.state_dict()
    index = _weight_index(optimizer, head.weight) if isinstance(head, PartialFCHead) else None
    if index is None or not ctx.is_distributed:
        return state
    entry = dict(state["state"].get(index, {}))
    for key, value in list(entry.items()):
        if torch.is_tensor(value) and value.shape[:1] == head.weight.shape[:1]:
            entry[key] = gather_shards(value, ctx)
    state["state"] = {**state["state"], index: entry}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], head: nn.Module,
                         ctx: DistributedContext) -> None:
    """Load a checkpoint's optimiser state, cutting a sharded head's W state to this rank's rows."""
    index = _weight_index(optimizer, head.weight) if isinstance(head, PartialFCHead) else None
    if index is not None and ctx.is_distributed and index in state["state"]:
        entry = {k: (shard_rows(v, ctx.rank, ctx.world_size)
                     if torch.is_tensor(v) and v.shape[:1] == (head.num_classes,) else v)
                 for k, v in state["state"][index].items()}
        state = {**state, "state": {**state["state"], index: entry}}
    optimizer.load_state_dict(state)
