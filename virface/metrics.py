"""Metric names: what each stage reports per epoch, which one selects by default, and how each
is shown in TensorBoard. Plain functions (no torch), shared by the stage loop, the search and the
benchmarks. Comparisons' statistics are in virface.stats."""
from __future__ import annotations

from virface.config import TEST_PREFIX
from virface.stage_table import stage_spec

METRIC_MODES = ("max", "min")

# Verification sets from hardest to easiest on real data (CFP-FP's frontal-profile pairs and
# CPLFW's poses are the hard ones; LFW is near saturation): the default selection metric is the
# accuracy on the hardest set given. Names not listed rank after the hard ones, before the easy.
PAIR_SET_HARDNESS = ("cfp_fp", "cplfw", "agedb", "calfw", "vgg2_fp")
EASY_PAIR_SETS = ("cfp_ff", "lfw")
EPOCH_METRICS = ("loss", "lr", "steps", "samples_per_s", "skipped_images", "epoch_time_s")
# Per pair set: accuracy, its standard error over pairs, its std over the 10 folds, TAR@FAR.
PAIR_SET_METRICS = ("acc", "acc_se", "acc_std", "tar_far1e-3")
# The generator and virface stages' diagnostics of their virtual instances, per epoch (names
# and meaning: virface.instance_diagnostics, which imports torch; this module does not).
INSTANCE_METRICS = ("vi_draw_cos", "vi_real_cos", "vi_identity_keep", "vi_w_pull", "vi_own_class_share")


def hardest_pair_set(names: list[str]) -> str:
    """The pair set whose accuracy selects by default: the first of PAIR_SET_HARDNESS found in a
    name, else a name not known to be easy, else the first given."""
    def rank(indexed: tuple[int, str]) -> tuple[int, int]:
        i, name = indexed
        lowered = name.lower()
        for k, token in enumerate(PAIR_SET_HARDNESS):
            if token in lowered:
                return k, i
        easy = [k for k, token in enumerate(EASY_PAIR_SETS) if token in lowered]
        return (len(PAIR_SET_HARDNESS) + 1 + easy[0], i) if easy else (len(PAIR_SET_HARDNESS), i)

    return min(enumerate(names), key=rank)[1]


def metric_mode(metric: str) -> str:
    """``min`` for losses and for an accuracy's uncertainty (``_acc_se``, ``_acc_std``), ``max``
    for everything else (accuracies, TAR)."""
    lower_is_better = ("loss", "_mse", "_kl", "_acc_se", "_acc_std")
    return "min" if metric.endswith(lower_is_better) or metric.startswith("loss") else "max"


def format_instance_metrics(metrics: dict[str, float]) -> str:
    """One line of the vi_* diagnostics, e.g. for the gate's warning and the stage tables."""
    return (f"identity keep {metrics['vi_identity_keep']:+.3f}, draw cos {metrics['vi_draw_cos']:.3f} "
            f"(real same-identity cos {metrics['vi_real_cos']:.3f}), nearest-W pull "
            f"{metrics['vi_w_pull']:+.3f}, own class wins {100 * metrics['vi_own_class_share']:.1f} %")


def stage_metric_names(method: str, pair_set_names: list[str]) -> list[str]:
    """Every per-epoch metric a stage reports (``best_<metric>`` aside) with these pair sets."""
    spec = stage_spec(method)
    names = list(EPOCH_METRICS) + list(spec.loss_terms)
    if spec.builds_generator:     # the instance diagnostics (virface.instance_diagnostics)
        names += list(INSTANCE_METRICS)
    if spec.trains_backbone:      # a frozen backbone has nothing new to verify
        names += [f"{ps}_{m}" for ps in pair_set_names for m in PAIR_SET_METRICS]
    return names


def selection_metric(method: str, pair_set_names: list[str], eval_on: bool = True,
                     best_metric: str | None = None) -> tuple[str, str]:
    """(metric, mode) that picks the best epoch, and by default a search's best trial: the
    hardest pair set's accuracy; gen_loss for the generator; the loss without pair sets."""
    spec = stage_spec(method)
    if best_metric:
        return best_metric, metric_mode(best_metric)
    if spec.default_metric:
        return spec.default_metric, metric_mode(spec.default_metric)
    if eval_on and pair_set_names and spec.trains_backbone:
        return f"{hardest_pair_set(pair_set_names)}_acc", "max"
    return "loss", "min"


# ---------------------------------------------------------------- one step per stage


def tensorboard_tag(metric: str) -> str:
    """The TensorBoard tag of a per-epoch metric: loss/..., val/..., best/... or train/..."""
    if metric.startswith("best_"):
        return f"best/{metric[5:]}"
    if metric.startswith(TEST_PREFIX):
        return f"test/{metric[len(TEST_PREFIX):]}"
    if metric.startswith("vi_"):
        return f"instances/{metric}"
    if metric.startswith(("loss", "gen_")):
        return f"loss/{metric}"
    if metric.endswith(tuple(f"_{m}" for m in PAIR_SET_METRICS)):
        return f"val/{metric}"
    return f"train/{metric}"


# ---------------------------------------------------------------- what a model costs

# Measured once per search trial when a search space names one as an objective (virface.cost):
# the backbone's parameter count, its multiply-accumulates for one image at the input size, and
# its batch-1 forward latency on the trial's device. Lower is better for all three.
COST_METRICS = ("params", "macs", "latency_ms")
