"""Metric names and modes: which metric selects a stage's best epoch (and a search's best trial),
in which direction, where TensorBoard shows it, and the paired differences comparisons report."""
import math

import pytest

from virface.metrics import (hardest_pair_set, metric_mode, selection_metric,
                             stage_metric_names, tensorboard_tag)
from virface.stats import paired_over_seeds


@pytest.mark.parametrize("names, hardest", [
    (["lfw", "cfp_fp", "agedb"], "cfp_fp"),                     # CFP-FP before AgeDB
    (["calfw", "agedb", "cplfw"], "cplfw"),
    (["calfw", "agedb"], "agedb"),
    (["synth_lfw", "synth_cfp_ff", "synth_cfp_fp"], "synth_cfp_fp"),   # a token inside a name
    (["LFW", "CFP_FP_frontal"], "CFP_FP_frontal"),               # any case
    (["lfw", "my_faces"], "my_faces"),                           # unknown: before the easy sets
    (["lfw", "cfp_ff"], "cfp_ff"),                               # of the easy, CFP-FF first
    (["mine", "yours"], "mine"),                                 # none known: the first given
    (["vgg2_fp", "other"], "vgg2_fp"),
])
def test_the_hardest_pair_set_selects(names, hardest):
    assert hardest_pair_set(names) == hardest


@pytest.mark.parametrize("metric, mode", [
    ("loss", "min"), ("loss_vc", "min"), ("loss_vi", "min"), ("gen_loss", "min"), ("gen_mse", "min"),
    ("gen_kl", "min"), ("synth_cfp_fp_acc", "max"), ("lfw_tar_far1e-3", "max"), ("virtual_classes", "max"),
    ("lfw_acc_se", "min"), ("synth_cfp_fp_acc_std", "min"), ("vi_identity_keep", "max"),
])
def test_losses_are_minimised_and_everything_else_maximised(metric, mode):
    assert metric_mode(metric) == mode


def test_a_stage_selects_on_its_hardest_pair_sets_accuracy():
    assert selection_metric("pretrain", ["lfw", "cfp_fp"]) == ("cfp_fp_acc", "max")
    assert selection_metric("virface", ["synth_lfw", "synth_cfp_fp"]) == ("synth_cfp_fp_acc", "max")


def test_without_pair_sets_or_evaluation_a_stage_selects_on_its_loss():
    assert selection_metric("pretrain", []) == ("loss", "min")
    assert selection_metric("virclass", ["lfw"], eval_on=False) == ("loss", "min")


def test_the_generator_selects_on_its_own_loss_whatever_the_pair_sets():
    assert selection_metric("generator", ["lfw", "cfp_fp"]) == ("gen_loss", "min")


def test_a_named_best_metric_wins_and_brings_its_mode():
    assert selection_metric("pretrain", ["lfw"], best_metric="lfw_tar_far1e-3") == ("lfw_tar_far1e-3", "max")
    assert selection_metric("generator", [], best_metric="gen_mse") == ("gen_mse", "min")


def test_a_stage_reports_its_loss_terms_and_pair_set_metrics_only_when_it_trains_the_backbone():
    pretrain = stage_metric_names("pretrain", ["lfw"])
    assert {"loss", "lr", "loss_arcface", "lfw_acc", "lfw_acc_std", "lfw_tar_far1e-3"} <= set(pretrain)
    generator = stage_metric_names("generator", ["lfw"])
    assert {"loss", "gen_mse", "gen_kl", "gen_loss"} <= set(generator)
    assert not any(name.startswith("lfw") for name in generator)
    assert "loss_vi" in stage_metric_names("virface", []) and "loss_vi" not in pretrain


@pytest.mark.parametrize("metric, tag", [
    ("best_lfw_acc", "best/lfw_acc"), ("test_lfw_acc", "test/lfw_acc"), ("loss", "loss/loss"),
    ("loss_vc", "loss/loss_vc"), ("gen_mse", "loss/gen_mse"), ("lfw_acc", "val/lfw_acc"),
    ("lfw_acc_std", "val/lfw_acc_std"), ("lfw_tar_far1e-3", "val/lfw_tar_far1e-3"), ("lr", "train/lr"),
    ("samples_per_s", "train/samples_per_s"), ("vi_identity_keep", "instances/vi_identity_keep"),
])
def test_each_metric_has_its_tensorboard_section(metric, tag):
    assert tensorboard_tag(metric) == tag


def test_paired_differences_are_seed_by_seed_in_points():
    # 0.90 - 0.88, 0.85 - 0.85, 0.80 - 0.81: +2, 0, -1 points; mean 1/3; sample std
    # sqrt(((5/3)^2 + (1/3)^2 + (4/3)^2) / 2) = sqrt(7/3).
    diff = paired_over_seeds([0.90, 0.85, 0.80], [0.88, 0.85, 0.81])
    assert diff["values"] == pytest.approx([2.0, 0.0, -1.0])
    assert diff["mean"] == pytest.approx(1 / 3)
    assert diff["std"] == pytest.approx(math.sqrt(7 / 3))
    assert diff["signs"] == "+0-"


def test_paired_differences_of_one_seed_have_no_std_and_take_a_scale():
    diff = paired_over_seeds([3.0], [1.0], scale=1.0)
    assert (diff["values"], diff["mean"], diff["std"], diff["signs"]) == ([2.0], 2.0, None, "+")
    assert paired_over_seeds([1.0, 2.0], [1.0 + 1e-12, 2.0 - 2e-9], scale=1.0)["signs"] == "0+"
    with pytest.raises(ValueError):
        paired_over_seeds([1.0, 2.0], [1.0])


def test_the_instance_figures_read_as_one_line_with_the_own_class_share_in_percent():
    from virface.metrics import format_instance_metrics

    assert format_instance_metrics({"vi_identity_keep": -0.0123, "vi_draw_cos": 0.97, "vi_real_cos": 0.69,
                                    "vi_w_pull": 0.045, "vi_own_class_share": 0.5}) == (
        "identity keep -0.012, draw cos 0.970 (real same-identity cos 0.690), nearest-W pull +0.045, "
        "own class wins 50.0 %")
