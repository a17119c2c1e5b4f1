"""The search runner's decisions, without Ray."""
from types import SimpleNamespace

from virface.search.runner import (SMOKE_FIXED, SearchOptions, base_train_config, best_checkpoint_of,
                                   stage_space)


def test_smoke_budget_shrinks_every_stage_and_its_data():
    options = SearchOptions(stage="virface", budget="smoke")
    for stage in ("pretrain", "generator", "virface"):
        space = stage_space(options, stage)
        assert space.budget.num_samples == 1
        for key, value in SMOKE_FIXED.items():
            assert space.fixed[key] == value
    assert base_train_config(options)["synthetic"]["n_labeled_ids"] == 16


def test_smoke_budget_leaves_real_data_alone():
    options = SearchOptions(stage="pretrain", budget="smoke", data={"labeled": "/data/faces"})
    assert "synthetic" not in base_train_config(options)


def test_command_line_overrides_resources_and_budget():
    options = SearchOptions(stage="virface", workers=4, gpus_per_worker=1, num_samples=7, max_concurrent=2,
                            arch="iresnet50")
    space = stage_space(options, "virface")
    assert (space.resources.workers, space.resources.gpus_per_worker) == (4, 1)
    assert (space.budget.num_samples, space.budget.max_concurrent_trials) == (7, 2)
    assert "arch" not in space.fixed                                # inherited downstream
    assert stage_space(options, "pretrain").fixed["arch"] == "iresnet50"


def test_storage_is_made_absolute():
    assert SearchOptions(stage="pretrain", storage="rel/dir").storage.startswith("/")


def fake_result(epochs):
    """A Tune result whose kept checkpoints are the given (epoch, accuracy) pairs."""
    ckpts = [(SimpleNamespace(path=f"/ckpt/epoch{e}"), {"epoch": e, "acc": acc}) for e, acc in epochs]
    return SimpleNamespace(best_checkpoints=ckpts, metrics={"epoch": epochs[-1][0]})


def test_manifest_takes_the_best_epoch_not_the_last():
    path, value = best_checkpoint_of(fake_result([(1, 0.7), (2, 0.9), (3, 0.8)]), "acc", "max")
    assert path == "/ckpt/epoch2/checkpoint.pt" and value == 0.9
    path, value = best_checkpoint_of(fake_result([(1, 0.7), (2, 0.9), (3, 0.8)]), "acc", "min")
    assert path == "/ckpt/epoch1/checkpoint.pt" and value == 0.7


def test_nan_epochs_are_never_the_best():
    path, value = best_checkpoint_of(fake_result([(1, float("nan")), (2, 0.6)]), "acc", "max")
    assert value == 0.6


def test_smoke_budget_keeps_asha_grace_within_its_single_epoch():
    space = stage_space(SearchOptions(stage="pretrain", budget="smoke"), "pretrain")
    assert space.max_epochs == 1 and space.scheduler.grace_period == 2      # the file's
    # ASHA's first rung is its grace period: cut to the run's single epoch.
    assert [milestone for milestone, _ in space.make_scheduler()._brackets[0]._rungs] == [1]


def test_fractional_gpus_put_several_trials_on_one_gpu():
    from virface.search.space import ResourcesSpec
    from virface.search.trial import TrialSetup, trial_resources, trials_at_once

    quarter = ResourcesSpec(workers=1, cpus_per_worker=2, gpus_per_worker=0.25)
    setup = TrialSetup(stage="pretrain", base_config={}, upstream_checkpoint=None, tb_root="/tb",
                       train_storage="/s", metric="acc", mode="max", resources=quarter)
    assert trial_resources(setup) == {"cpu": 2, "gpu": 0.25}           # what Tune reserves
    assert trials_at_once(quarter, {"CPU": 16.0, "GPU": 1.0}) == 4      # four on one GPU
    assert trials_at_once(quarter, {"CPU": 6.0, "GPU": 1.0}) == 3       # CPUs run out first
    assert trials_at_once(quarter, {"CPU": 16.0, "GPU": 2.0}) == 8
    assert trials_at_once(ResourcesSpec(workers=2, cpus_per_worker=1), {"CPU": 2.0}) == 1
    assert trials_at_once(ResourcesSpec(workers=1, cpus_per_worker=1, gpus_per_worker=1), {"CPU": 8.0}) == 0
