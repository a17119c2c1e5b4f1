"""The search runner's decisions, without Ray."""
import os
import shutil
import time
from types import SimpleNamespace

import pytest

from virface.errors import ConfigError

from virface.search.runner import SMOKE_FIXED, SearchOptions, base_train_config, sigterm_as_sigint, stage_space
from virface.search.trial import ReportedCheckpoints, best_checkpoint_of, checkpoint_retention


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


def test_run_size_options_override_every_stage_of_the_chain_and_the_smoke_budget():
    options = SearchOptions(stage="virface", budget="smoke", max_epoch=4, steps_per_epoch=5, seed=7, num_samples=2)
    assert options.run_overrides() == {"num_samples": 2, "max_epoch": 4, "steps_per_epoch": 5, "seed": 7}
    for stage in ("pretrain", "generator", "virface"):
        space = stage_space(options, stage)
        assert (space.fixed["max_epoch"], space.fixed["steps_per_epoch"], space.fixed["seed"]) == (4, 5, 7)
        assert space.budget.num_samples == 2 and space.max_epochs == 4
        assert space.searcher.arguments["seed"] == 7
        scheduler = space.make_scheduler("m", "max")
        assert scheduler is None or scheduler._max_t == 4
    # Not given: each space's own.
    plain = stage_space(SearchOptions(stage="pretrain"), "pretrain")
    assert "seed" not in plain.fixed and plain.searcher.arguments["seed"] == 0
    assert SearchOptions(stage="pretrain").run_overrides() == {}


def test_a_run_size_option_that_a_space_searches_is_an_error(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("parameters:\n  max_epoch: {type: int, low: 2, high: 6, default: 4}\n")
    with pytest.raises(ConfigError, match=r"max_epoch: --max_epoch 3 sets it for every stage, but .*s\.yaml "
                                          r"searches max_epoch; drop the option or the parameter"):
        stage_space(SearchOptions(stage="pretrain", space=str(space), max_epoch=3), "pretrain")


@pytest.mark.parametrize("key,value", [("max_epoch", 0), ("steps_per_epoch", 0), ("seed", -1)])
def test_run_size_options_out_of_range_are_named(key, value):
    with pytest.raises(ConfigError, match=f"{key}: {value} must be >= "):
        SearchOptions(stage="pretrain", **{key: value})


def test_the_command_line_spells_them_as_virface_train_does():
    from virface.search.cli import build_parser, options_from_args

    options = options_from_args(build_parser().parse_args(
        ["--max_epoch", "3", "--steps-per-epoch", "4", "--num-samples", "2", "--seed", "1", "--seeds", "5"]))
    assert options.run_overrides() == {"num_samples": 2, "max_epoch": 3, "steps_per_epoch": 4, "seed": 1}
    assert options.seeds == 5


def test_storage_is_made_absolute():
    assert SearchOptions(stage="pretrain", storage="rel/dir").storage.startswith("/")


class TuneSide:
    """Tune's side of a trial's reports, as Ray 2.60 does it: each reported directory is copied
    to storage as checkpoint_NNNNNN and registered with Tune's own checkpoint manager under the
    search's retention, which deletes what it does not keep."""

    def __init__(self, storage):
        from ray.train._internal.checkpoint_manager import _CheckpointManager

        self.storage, self.count, self.metrics = storage, 0, None
        self.manager = _CheckpointManager(checkpoint_retention())

    def report(self, metrics, checkpoint):
        from ray import tune
        from ray.train._internal.session import _TrainingResult

        target = self.storage / f"checkpoint_{self.count:06d}"
        shutil.copytree(checkpoint.path, target)
        self.count += 1
        self.manager.register_checkpoint(_TrainingResult(tune.Checkpoint.from_directory(str(target)), metrics))
        self.metrics = metrics

    def kept(self):
        return sorted(p.name for p in self.storage.glob("checkpoint_*"))

    def result(self):
        """What the search reads of the finished trial: its latest checkpoint and last result."""
        latest = self.manager.latest_checkpoint_result
        return SimpleNamespace(checkpoint=latest.checkpoint if latest else None, metrics=self.metrics)


def run_epochs(checkpoints, tune_side, run_dir, accuracies, first_epoch=1, best=(None, None)):
    """A trial's epochs as StageRun runs them: each saves epoch_NNN.pt (its content names the
    epoch), tracks the best epoch by accuracy (max; a tie keeps the earlier epoch), reports
    ``acc`` and ``best_acc``, then deletes its checkpoint (keep_epoch_checkpoints=False)."""
    best_epoch, best_value = best
    for epoch, acc in enumerate(accuracies, start=first_epoch):
        path = run_dir / f"epoch_{epoch:03d}.pt"
        path.write_text(f"epoch {epoch}")
        if best_value is None or acc > best_value:
            best_epoch, best_value = epoch, acc
        checkpoints.report({"epoch": epoch, "acc": acc, "best_acc": best_value}, str(path), best_epoch)
        path.unlink()
    return best_epoch, best_value


@pytest.fixture
def trial(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "storage").mkdir()
    tune_side = TuneSide(tmp_path / "storage")
    return ReportedCheckpoints(str(tmp_path / "work"), report=tune_side.report), tune_side, tmp_path / "run"


def test_the_checkpoint_a_lagging_snapshot_names_survives_the_next_epochs_checkpoint(trial):
    # Tune deletes what it does not keep as a new checkpoint arrives, before its next snapshot,
    # which may still name the checkpoint before (issue: kept by score, epoch 2's was deleted when
    # the better epoch 3 arrived, and the resumed trial could not be restored).
    checkpoints, tune_side, run_dir = trial
    accuracies = [0.9, 0.5, 0.8, 0.7, 0.95, 0.6]
    for n, acc in enumerate(accuracies):
        run_epochs(checkpoints, tune_side, run_dir, [acc], first_epoch=n + 1,
                   best=(1, 0.9) if n else (None, None))
        names = [f"checkpoint_{k:06d}" for k in range(max(0, n - 1), n + 1)]
        assert tune_side.kept() == names                     # the latest, the one before; no more


def test_the_manifest_takes_the_trials_best_epoch_not_its_last(trial):
    checkpoints, tune_side, run_dir = trial
    run_epochs(checkpoints, tune_side, run_dir, [0.7, 0.9, 0.8, 0.6])
    assert tune_side.kept() == ["checkpoint_000002", "checkpoint_000003"]
    path, value = best_checkpoint_of(tune_side.result(), "acc")
    assert path.endswith("checkpoint_000003/best.pt") and value == 0.9
    assert open(path).read() == "epoch 2"


def test_a_trial_whose_last_epoch_is_its_best_stores_it_once(trial):
    checkpoints, tune_side, run_dir = trial
    run_epochs(checkpoints, tune_side, run_dir, [0.7, 0.9, 0.6, 0.95])
    path, value = best_checkpoint_of(tune_side.result(), "acc")
    assert path.endswith("checkpoint_000003/checkpoint.pt") and value == 0.95
    assert open(path).read() == "epoch 4"
    assert sorted(os.listdir(os.path.dirname(path))) == ["checkpoint.pt"]


def test_a_tie_keeps_the_earlier_epoch_as_the_best(trial):
    checkpoints, tune_side, run_dir = trial
    run_epochs(checkpoints, tune_side, run_dir, [0.8, 0.9, 0.9])
    path, value = best_checkpoint_of(tune_side.result(), "acc")
    assert open(path).read() == "epoch 2" and value == 0.9


def test_a_restored_trial_keeps_its_best_epoch_from_before_the_restore(trial, tmp_path):
    checkpoints, tune_side, run_dir = trial
    best = run_epochs(checkpoints, tune_side, run_dir, [0.7, 0.9, 0.8])
    # The driver was killed; --resume restores the trial, in a new process and work folder,
    # from its latest directory (epoch 3's).
    (tmp_path / "work2").mkdir()
    restored = ReportedCheckpoints(str(tmp_path / "work2"), report=tune_side.report)
    resume = restored.restore(tune_side.result().checkpoint.path)
    assert open(resume).read() == "epoch 3"
    run_epochs(restored, tune_side, run_dir, [0.6], first_epoch=4, best=best)
    path, value = best_checkpoint_of(tune_side.result(), "acc")
    assert open(path).read() == "epoch 2" and value == 0.9
    run_epochs(restored, tune_side, run_dir, [0.95], first_epoch=5, best=best)
    path, value = best_checkpoint_of(tune_side.result(), "acc")
    assert open(path).read() == "epoch 5" and value == 0.95


def test_a_trial_without_a_finite_best_or_a_checkpoint_offers_none():
    checkpoint = SimpleNamespace(path="/ckpt/checkpoint_000001")
    assert best_checkpoint_of(SimpleNamespace(checkpoint=checkpoint, metrics={"best_acc": float("nan")}),
                              "acc") == (None, None)
    assert best_checkpoint_of(SimpleNamespace(checkpoint=None, metrics={"best_acc": 0.9}), "acc") == (None, None)
    assert best_checkpoint_of(SimpleNamespace(checkpoint=checkpoint, metrics={}), "acc") == (None, None)


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


def test_a_stop_signal_is_recorded_once_and_a_second_one_stops_at_once():
    import signal

    from virface.search.runner import sigterm_as_sigint

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with sigterm_as_sigint() as interrupted:
        assert not interrupted.is_set()
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"     # Tune's would swallow it
        os.kill(os.getpid(), signal.SIGTERM)                         # Tune is asked to stop (SIGUSR1)
        assert interrupted.is_set()
        with sigterm_as_sigint() as nested:                          # a comparison's stage search
            assert nested is interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)                      # the second: stop now
    assert {s: signal.getsignal(s) for s in before} == before
    with sigterm_as_sigint() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)                          # Ctrl-C is recorded the same way
        assert interrupted.is_set()


class TrialSaving:
    """A Tune trial as the stop sees it: whether a checkpoint it reported is being registered."""

    def __init__(self, is_saving):
        self.is_saving = is_saving


def test_a_stop_lets_tune_register_a_reported_checkpoint_before_stopping_it():
    # Tune registers a trial's reported checkpoint a step after the report: stopped in between,
    # its snapshot names none, and --resume trained the trial from the start.
    import signal

    from virface.search.callbacks import StopWhenSaved

    stops = []
    after_each_step = StopWhenSaved()
    with sigterm_as_sigint() as interrupted:
        signal.signal(signal.SIGUSR1, lambda *_: stops.append("stop"))    # Tune's, while it runs
        after_each_step.on_step_end(iteration=0, trials=[TrialSaving(False)])
        assert stops == []                                    # no stop asked: Tune goes on
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted.is_set() and stops == []           # asked, but not yet passed on
        after_each_step.on_step_end(iteration=1, trials=[TrialSaving(False), TrialSaving(True)])
        assert stops == []                                    # a checkpoint is being registered
        after_each_step.on_step_end(iteration=2, trials=[TrialSaving(False), TrialSaving(False)])
        assert stops == ["stop"]
    after_each_step.on_step_end(iteration=3, trials=[])       # outside a search: nothing to stop
    assert stops == ["stop"]


def test_a_loop_that_never_gets_there_is_stopped_after_the_wait_and_never_after_the_search(monkeypatch):
    import signal

    from virface.search import runner

    monkeypatch.setattr(runner, "STOP_WAIT_S", 0.2)
    stops = []
    with sigterm_as_sigint():
        signal.signal(signal.SIGUSR1, lambda *_: stops.append("stop"))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
        assert stops == ["stop"]                              # no step came: stopped anyway
    with sigterm_as_sigint():
        os.kill(os.getpid(), signal.SIGTERM)
    # The search ended before the wait did: no SIGUSR1 later (its own action ends the process).
    time.sleep(0.5)


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_ray_failing_to_start_is_named_and_says_how_to_continue(tmp_path, monkeypatch, capsys, resume):
    import ray

    from virface.search.cli import main

    def overloaded(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because some "
                        "of the raylet failed to startup or the GCS has become overloaded.")
    monkeypatch.setattr(ray, "init", overloaded)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["--stage", "pretrain", "--budget", "smoke", "--storage", str(tmp_path), "--quiet"]
    assert main(argv + (["--resume"] if resume else [])) == 2
    err = capsys.readouterr().err
    assert ("error: the local Ray failed to start (Exception: The current node timed out during startup. "
            "This could happen because some of the raylet failed to startup or the GCS has become "
            "overloaded.); no trial ran and nothing of experiment default was changed: run the same "
            "command again") in err
    assert ("--resume continues the search where it stopped" if resume else "with --resume if an") in err
    assert os.listdir(tmp_path / "default") == []                     # the lock released, nothing else


def test_a_trial_restored_from_a_lagging_snapshot_continues_from_its_newest_whole_report(trial, tmp_path):
    # kill -9 right after a trial finished: Tune's snapshot still names epoch 1's directory,
    # though the trial had reported epoch 2, its last. It was trained again from epoch 1.
    from virface.checkpoint import load_checkpoint, save_checkpoint

    checkpoints, tune_side, run_dir = trial
    for epoch, acc, best in ((1, 0.7, 1), (2, 0.9, 2)):
        metrics = {"epoch": epoch, "acc": acc, "best_acc": max(0.7, acc)}
        path = save_checkpoint({"epoch": epoch, "metrics": metrics,
                                "best": {"metric": "acc", "epoch": best, "value": max(0.7, acc)}},
                               str(run_dir / f"epoch_{epoch:03d}.pt"))
        checkpoints.report(metrics, path, best)
    (tmp_path / "storage" / "checkpoint_000009").mkdir()             # a later one, cut short
    (tmp_path / "storage" / "checkpoint_000009" / "checkpoint.pt").write_bytes(
        open(tmp_path / "storage" / "checkpoint_000001" / "checkpoint.pt", "rb").read()[:100])
    (tmp_path / "work2").mkdir()
    restored = ReportedCheckpoints(str(tmp_path / "work2"), report=tune_side.report)
    tune_side.metrics = None
    resume = restored.restore(str(tmp_path / "storage" / "checkpoint_000000"))   # the snapshot's
    assert load_checkpoint(resume)["epoch"] == 2                      # not trained again
    # Tune writes its next report into checkpoint_000001 again: what it copies there must not be
    # that directory's own file (a hard link), or the copy empties it.
    assert not os.path.samefile(resume, tmp_path / "storage" / "checkpoint_000001" / "checkpoint.pt")
    restored.report_unseen({"params": 7.0})                           # Tune sees epoch 2 once
    assert tune_side.metrics == {"epoch": 2, "acc": 0.9, "best_acc": 0.9, "params": 7.0}
    path, value = best_checkpoint_of(tune_side.result(), "acc")
    assert load_checkpoint(path)["epoch"] == 2 and value == 0.9
    restored.report_unseen({})
    assert tune_side.count == 3                                       # epochs 1, 2 and 2 once more


def test_a_trial_restored_from_its_newest_report_reports_nothing_again(trial, tmp_path):
    from virface.checkpoint import save_checkpoint

    checkpoints, tune_side, run_dir = trial
    metrics = {"epoch": 1, "acc": 0.7, "best_acc": 0.7}
    checkpoints.report(metrics, save_checkpoint({"epoch": 1, "metrics": metrics, "best": {"epoch": 1}},
                                                str(run_dir / "epoch_001.pt")), 1)
    (tmp_path / "work2").mkdir()
    restored = ReportedCheckpoints(str(tmp_path / "work2"), report=tune_side.report)
    restored.restore(str(tmp_path / "storage" / "checkpoint_000000"))
    restored.report_unseen({})
    assert tune_side.count == 1


def test_a_multi_worker_trial_holds_no_cpu_and_tune_starts_only_the_trials_whose_workers_fit():
    from virface.search.space import ResourcesSpec
    from virface.search.trial import TrialSetup, concurrent_trials, reuses_actors, trial_resources

    two = ResourcesSpec(workers=2, cpus_per_worker=1)
    setup = TrialSetup(stage="pretrain", base_config={}, upstream_checkpoint=None, tb_root="/tb",
                       train_storage="/s", metric="acc", mode="max", resources=two)
    # The trial only drives its Ray Train run: its workers' CPUs are Ray Train's to reserve.
    assert trial_resources(setup) == {"cpu": 0, "memory": 1}
    assert concurrent_trials(two, 4, {"CPU": 2.0}) == 1             # 2 CPUs: one group at a time
    assert concurrent_trials(two, 4, {"CPU": 5.0}) == 2
    assert concurrent_trials(two, None, {"CPU": 8.0}) == 4
    assert concurrent_trials(two, 3, {"CPU": 1.0}) == 1             # never 0 (the fit check says why)
    one = ResourcesSpec(workers=1, cpus_per_worker=1)
    assert concurrent_trials(one, 4, {"CPU": 2.0}) == 4              # Tune holds them to the CPUs
    assert reuses_actors(one) and not reuses_actors(two)


def test_a_multi_worker_trials_checkpoint_is_ray_trains_which_tune_knows_by_path(tmp_path):
    # TuneReportCallback adds the persisted Ray Train checkpoint's path to the trial's metrics;
    # Tune itself holds no checkpoint of the trial.
    from virface.search.trial import best_checkpoint_of

    directory = tmp_path / "train_pretrain_x" / "checkpoint_epoch=003"
    directory.mkdir(parents=True)
    (directory / "checkpoint.pt").write_text("epoch 3")
    (directory / "best.pt").write_text("epoch 2")
    result = SimpleNamespace(checkpoint=None, metrics={"epoch": 3, "acc": 0.5, "best_acc": 0.75,
                                                       "checkpoint_path": str(directory)})
    assert best_checkpoint_of(result, "acc") == (str(directory / "best.pt"), 0.75)
    assert best_checkpoint_of(SimpleNamespace(checkpoint=None, metrics={"best_acc": 0.75}), "acc") == (None, None)
