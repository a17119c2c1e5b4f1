"""What a search records about its trials, checked through the readers people use: TensorBoard's
HParams backend and Optuna's study. No Ray cluster needed."""
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from tensorboard_view import hparams_view
from virface.search.callbacks import TrialProgress
from virface.search.report import (MIN_TRIALS_FOR_IMPORTANCE, TrialRow, read_trials, write_optuna_plots,
                                   write_trials)
from virface.search.searcher import StageOptunaSearch


def fake_trial(trial_id, config, epochs, status="TERMINATED", error_file=None, best=None):
    return SimpleNamespace(trial_id=trial_id, config=config, status=status, error_file=error_file,
                           last_result={"epoch": epochs, "best_cfp_fp_acc": best} if epochs else {})


def write_scalars(run_dir, values):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    for epoch, (acc, best) in enumerate(values, start=1):
        writer.add_scalar("val/cfp_fp_acc", acc, epoch)
        writer.add_scalar("best/cfp_fp_acc", best, epoch)
    writer.close()


def test_tensorboard_shows_each_trials_own_parameters_outcome_and_best_epoch(tmp_path):
    tb_root = tmp_path / "virclass" / "tb"
    progress = TrialProgress("virclass", "cfp_fp_acc", ["lr", "unlabel_batch_size", "g_lr"],
                             num_samples=3, max_epochs=4, max_concurrent=1, tb_root=str(tb_root),
                             print_lines=False)
    # Completed: 4 epochs, best at epoch 2. Stopped early by ASHA at epoch 2. Failed in epoch 1.
    write_scalars(str(tb_root / "virclass_a"), [(0.80, 0.80), (0.90, 0.90), (0.85, 0.90), (0.84, 0.90)])
    write_scalars(str(tb_root / "virclass_b"), [(0.70, 0.70), (0.72, 0.72)])
    trials = [fake_trial("a", {"lr": 0.01, "unlabel_batch_size": 128, "g_lr": None, "max_epoch": 4}, 4),
              fake_trial("b", {"lr": 0.2, "unlabel_batch_size": 64, "g_lr": 0.05}, 2),
              fake_trial("c", {"lr": 0.5, "unlabel_batch_size": 64}, 0, status="ERROR")]
    for trial in trials:
        progress.on_trial_start(0, trials, trial)
    progress.on_trial_complete(0, trials, trials[0])
    progress.on_trial_complete(0, trials, trials[1])
    progress.on_trial_error(0, trials, trials[2])

    experiment, sessions = hparams_view(str(tmp_path))
    assert {h.name for h in experiment.hparam_infos} == {"stage", "outcome", "lr", "unlabel_batch_size", "g_lr"}
    a, b, c = (sessions[f"virclass/tb/virclass_{t}"] for t in "abc")
    # Ints as ints (TensorBoard would print the number 128 as "128.00"), unset values absent.
    assert a["hparams"] == {"stage": "virclass", "outcome": "completed", "lr": 0.01,
                            "unlabel_batch_size": "128"}
    assert b["hparams"]["outcome"] == "stopped early" and b["hparams"]["g_lr"] == 0.05
    assert c["hparams"]["outcome"] == "failed"
    assert (a["status"], b["status"], c["status"]) == ("STATUS_SUCCESS", "STATUS_SUCCESS", "STATUS_FAILURE")
    # The metric the search selects on is the best epoch's, not the last one's.
    assert a["metrics"]["best/cfp_fp_acc"] == pytest.approx(0.90)
    assert a["metrics"]["val/cfp_fp_acc"] == pytest.approx(0.84)


def searcher(max_epochs=3):
    def space(trial):
        trial.suggest_float("lr", 0.01, 0.1, log=True)
        return {"max_epoch": max_epochs}

    return StageOptunaSearch(space=space, metric="best_acc", mode="max",
                             sampler=optuna.samplers.RandomSampler(seed=0), objective_name="acc",
                             max_epochs=max_epochs)


def test_the_optuna_study_records_what_the_search_selects_on():
    search = searcher()
    for trial_id in ("full", "stopped", "failed"):
        assert "lr" in search.suggest(trial_id)
    # A full trial whose best epoch was the second: COMPLETE with the best value, not the last.
    for epoch, best in ((1, 0.70), (2, 0.90)):
        search.on_trial_result("full", {"best_acc": best, "acc": best, "epoch": epoch})
    search.on_trial_complete("full", {"best_acc": 0.90, "acc": 0.85, "epoch": 3})
    # ASHA stops a trial at epoch 2: Tune passes that last result to on_trial_complete only.
    search.on_trial_result("stopped", {"best_acc": 0.60, "epoch": 1})
    search.on_trial_complete("stopped", {"best_acc": 0.65, "epoch": 2})
    search.on_trial_complete("failed", None, error=True)

    study = search._ot_study
    assert study.metric_names == ["acc"]
    full, stopped, failed = study.trials
    assert (full.state, full.value) == (TrialState.COMPLETE, 0.90)
    assert full.intermediate_values == {1: 0.70, 2: 0.90, 3: 0.90}
    assert (stopped.state, stopped.value) == (TrialState.PRUNED, 0.65)
    assert stopped.intermediate_values == {1: 0.60, 2: 0.65}
    assert failed.state == TrialState.FAIL and failed.value is None


def test_importance_plots_wait_for_enough_completed_trials(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="s", direction="maximize",
                                storage=JournalStorage(JournalFileBackend(journal)))
    lines = []
    for k in range(MIN_TRIALS_FOR_IMPORTANCE - 1):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
        study.tell(trial, 0.5 + 0.1 * k)
    written = write_optuna_plots(journal, "s", str(tmp_path / "plots"), "acc", say=lines.append)
    assert [p.rsplit("/", 1)[1] for p in written] == ["optimization_history.png"]
    assert lines == [f"param_importances.png not drawn: it needs at least {MIN_TRIALS_FOR_IMPORTANCE} "
                     f"completed trials, and this stage has {MIN_TRIALS_FOR_IMPORTANCE - 1} "
                     "(stopped-early trials do not count)"]
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    study.tell(trial, 0.9)
    written = write_optuna_plots(journal, "s", str(tmp_path / "plots"), "acc", say=lines.append)
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["optimization_history.png", "param_importances.png"]


def test_the_trial_table_round_trips_through_trials_json(tmp_path):
    rows = [TrialRow("a", {"lr": 0.1, "s": 32}, 0.91, 6, "completed"),
            TrialRow("b", {"lr": 0.3}, None, 1, "failed", "NonFiniteLossError: loss is nan")]
    write_trials(str(tmp_path / "trials.json"), "pretrain", "lfw_acc", "max", 6, rows)
    assert read_trials(str(tmp_path / "trials.json")) == ("lfw_acc", rows)
    assert rows[1].status == "ERROR: NonFiniteLossError: loss is nan"


def lr_space(trial):
    trial.suggest_float("lr", 0.01, 0.1, log=True)
    return {}


def journal_searcher(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    space = lr_space
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    return StageOptunaSearch(space=space, metric="best_acc", mode="max", study_name="s", storage=storage,
                             sampler=optuna.samplers.RandomSampler(seed=0), objective_name="acc", max_epochs=2)


def test_a_journal_ahead_of_tunes_restored_state_is_accepted(tmp_path):
    # The driver died after the journal recorded trial t1's end and before Tune saved its state:
    # the restored search runs t1's last epoch again and reports it. That must not crash.
    search = journal_searcher(tmp_path)
    search.suggest("t1")
    search._ot_study.tell(search._ot_trials["t1"].number, 0.8)     # what the journal holds
    search.on_trial_result("t1", {"best_acc": 0.7, "epoch": 2})
    search.on_trial_complete("t1", {"best_acc": 0.7, "epoch": 2})
    [trial] = search._ot_study.trials
    assert (trial.state, trial.value) == (TrialState.COMPLETE, 0.8)


def test_a_trial_the_journal_started_but_tune_never_recorded_is_marked_abandoned(tmp_path):
    search = journal_searcher(tmp_path)
    search.suggest("t1")
    search.save(str(tmp_path / "searcher.pkl"))       # Tune's last snapshot
    search.suggest("t2")                               # then the driver died
    restored = journal_searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    states = [t.state for t in restored._ot_study.trials]
    assert states == [TrialState.RUNNING, TrialState.FAIL]
    restored.on_trial_complete("t1", {"best_acc": 0.9, "epoch": 2})
    assert restored._ot_study.trials[0].value == 0.9


def test_every_optuna_trial_carries_its_tune_id_checkpoint_and_outcome(tmp_path):
    root = tmp_path / "search_pretrain"
    for trial_id, best_epoch_earlier in (("full", True), ("stopped", False)):
        folder = root / f"pretrain_{trial_id}" / "checkpoint_000001"
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").write_bytes(b"x")
        if best_epoch_earlier:
            (folder / "best.pt").write_bytes(b"x")
    search = StageOptunaSearch(space=lr_space, metric="best_acc", mode="max",
                               sampler=optuna.samplers.RandomSampler(seed=0), objective_name="acc",
                               max_epochs=3, trial_root=str(root), trial_dir="pretrain_{trial_id}")
    for trial_id in ("full", "stopped", "failed"):
        search.suggest(trial_id)
    # While running, the trial already names its Tune trial.
    assert search._ot_study.trials[0].user_attrs == {"tune_trial_id": "full"}
    search.on_trial_complete("full", {"best_acc": 0.9, "epoch": 3, "checkpoint_dir_name": "checkpoint_000001"})
    search.on_trial_complete("stopped", {"best_acc": 0.6, "epoch": 1, "checkpoint_dir_name": "checkpoint_000001"})
    search.on_trial_complete("failed", {"epoch": 0, "checkpoint_dir_name": None}, error=True)
    full, stopped, failed = (t.user_attrs for t in search._ot_study.trials)
    # The best epoch's file: best.pt when an earlier epoch was the best, else the last checkpoint.
    assert full == {"tune_trial_id": "full", "outcome": "completed",
                    "checkpoint": str(root / "pretrain_full" / "checkpoint_000001" / "best.pt")}
    assert stopped == {"tune_trial_id": "stopped", "outcome": "stopped early",
                       "checkpoint": str(root / "pretrain_stopped" / "checkpoint_000001" / "checkpoint.pt")}
    assert failed == {"tune_trial_id": "failed", "outcome": "failed"}


def test_the_hparams_config_lists_outcome_and_every_searched_parameter_first(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from virface.search.callbacks import write_stage_hparams
    from virface.search.space import Parameter

    experiment = tmp_path / "default"
    pretrain = [Parameter("lr", FloatDistribution(0.01, 0.1)), Parameter("s", IntDistribution(16, 64)),
                Parameter("m", FloatDistribution(0.2, 0.6))]
    generator = [Parameter("g_lr", FloatDistribution(0.001, 0.1))]
    virface = [Parameter(n, FloatDistribution(0.1, 1.0)) for n in ("KL", "L2", "lr", "m")] + [
        Parameter("optim_mode", CategoricalDistribution(["alternate", "joint"])),
        Parameter("vi_to_backbone", CategoricalDistribution([False, True]))]
    reported = {"epoch": 2, "loss": 1.0, "synth_lfw_acc": 0.9, "best_synth_lfw_acc": 0.9, "lr": 0.1,
                "test_synth_lfw_acc": 0.8, "time_this_iter_s": 3.0, "trial_id": "a", "training_iteration": 2}
    # Every generator trial completed with the same value: TensorBoard alone would hide both columns.
    write_scalars(str(experiment / "generator" / "tb" / "generator_a"), [(0.5, 0.5)])
    progress = TrialProgress("generator", "gen_loss", ["g_lr"], num_samples=1, max_epochs=1, max_concurrent=1,
                             tb_root=str(experiment / "generator" / "tb"), print_lines=False)
    trial = fake_trial("a", {"g_lr": 0.01}, 1)
    progress.on_trial_start(0, [trial], trial)
    progress.on_trial_complete(0, [trial], trial)
    for stage, parameters in (("pretrain", pretrain), ("generator", generator), ("virface", virface)):
        write_stage_hparams(str(experiment), stage, parameters, [reported])

    # TensorBoard lists the columns it ticks ("differs") first, each group by name.
    view, sessions = hparams_view(str(experiment / "generator" / "tb"))
    assert [(h.name, h.differs) for h in view.hparam_infos] == [("g_lr", True), ("outcome", True), ("stage", True)]
    assert sessions["generator_a"]["hparams"] == {"stage": "generator", "outcome": "completed", "g_lr": 0.01}
    assert [m.name.tag for m in view.metric_infos] == ["best/synth_lfw_acc", "loss/loss", "test/synth_lfw_acc",
                                                       "train/lr", "val/synth_lfw_acc"]
    # Every parameter listed; ticked: the outcome and the space's first four.
    view, _ = hparams_view(str(experiment / "virface" / "tb"))
    assert [(h.name, h.differs) for h in view.hparam_infos] == [
        ("KL", True), ("L2", True), ("lr", True), ("m", True), ("outcome", True),
        ("optim_mode", False), ("stage", False), ("vi_to_backbone", False)]
    from tensorboard.plugins.hparams import api_pb2

    types = {h.name: api_pb2.DataType.Name(h.type) for h in view.hparam_infos}
    assert (types["KL"], types["optim_mode"], types["vi_to_backbone"]) == \
        ("DATA_TYPE_FLOAT64", "DATA_TYPE_STRING", "DATA_TYPE_BOOL")
    # The whole experiment: every stage's columns, each name once; ticked: outcome, stage and the
    # first three parameters in chain order.
    view, sessions = hparams_view(str(experiment))
    assert {h.name for h in view.hparam_infos if h.differs} == {"outcome", "stage", "lr", "s", "m"}
    assert {h.name for h in view.hparam_infos if not h.differs} == {"g_lr", "KL", "L2", "optim_mode",
                                                                    "vi_to_backbone"}
    assert sessions["generator/tb/generator_a"]["hparams"]["outcome"] == "completed"


def test_the_driver_prints_each_scored_pair_set_once_before_the_epochs_line(tmp_path, capsys):
    from virface.progress import EvalProgress, StepProgress, write_progress

    tb_root = tmp_path / "pretrain" / "tb"
    progress = TrialProgress("pretrain", "cfp_fp_acc", ["lr"], num_samples=1, max_epochs=2, max_concurrent=1,
                             tb_root=str(tb_root))
    trial = fake_trial("a", {"lr": 0.1}, 0, status="RUNNING")
    progress.on_trial_start(0, [trial], trial)
    run = str(tb_root / "pretrain_a")
    (tb_root / "pretrain_a").mkdir(parents=True)
    write_progress(run, StepProgress("pretrain", 1, 2, 5, 5, 3.0, 100.0, 0.0, 9.0))
    write_progress(run, EvalProgress("pretrain", 1, 2, "cfp_fp", 1, 2, 700, 2.0, 1.7))
    progress.on_step_end(0, [trial])
    write_progress(run, EvalProgress("pretrain", 1, 2, "lfw", 2, 2, 600, 1.0, 0.0))
    progress.on_trial_result(0, [trial], trial, {"epoch": 1, "cfp_fp_acc": 0.8, "best_cfp_fp_acc": 0.8})
    progress.next_poll = 0
    progress.on_step_end(0, [trial])                       # nothing new: nothing printed twice
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "[pretrain] trial 1/1 a | epoch 1/2 step 5/5 | loss 3 | 100 img/s | trial 0:09 left | stage <= 0:09 left",
        "[pretrain] trial 1/1 a | epoch 1/2 evaluated cfp_fp (1/2): 700 pairs, 350 pairs/s | evaluation 0:02 left",
        "[pretrain] trial 1/1 a | epoch 1/2 evaluated lfw (2/2): 600 pairs, 600 pairs/s | evaluation 0:00 left",
        "[pretrain] trial 1/1 a | epoch 1/2: cfp_fp_acc=0.8000 (best 0.8000)"]
