"""Progress within a run: speed, loss and time left every log_every steps, in lines, files and
TensorBoard."""
import pytest

from virface.config import TrainConfig
from virface.progress import (EvalClock, EvalProgress, RunClock, StepProgress, format_duration,
                              read_eval_progress, read_progress, write_progress)
from virface.stages import run_stage


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (0, 59.6, 75, 3725, None, -1)] == \
        ["0:00", "1:00", "1:15", "1:02:05", "?", "?"]


def test_time_left_counts_this_epochs_steps_later_epochs_and_their_evaluation():
    clock = RunClock("pretrain", max_epoch=3)
    clock.eval_s = 4.0                              # measured after the previous epoch
    # Epoch 2, 10 of 40 steps in 5 s: 0.5 s a step.
    p = clock.progress(epoch=2, step=10, steps=40, elapsed_s=5.0, loss=3.0, samples=640)
    assert p.epoch_left_s == pytest.approx(15.0)                  # 30 steps x 0.5 s
    assert p.run_left_s == pytest.approx(15.0 + 4.0 + (20.0 + 4.0))   # + its eval + epoch 3 and eval
    assert p.samples_per_s == pytest.approx(128.0)
    assert p.fraction_done == pytest.approx((1 + 10 / 40) / 3)
    assert p.line() == ("pretrain epoch 2/3 step 10/40 | loss 3 | 128 img/s | epoch 0:15 left | "
                        "run 0:43 left")


def test_evaluation_time_left_is_the_remaining_pairs_at_the_speed_so_far():
    clock = EvalClock("virface", 3, 6, {"lfw": 6000, "cfp_fp": 7000, "test_agedb": 6000})
    first = clock.record("lfw", 12.0)                  # 500 pairs/s
    assert (first.index, first.count, first.pairs_per_s) == (1, 3, 500.0)
    assert first.left_s == pytest.approx(13000 / 500)
    second = clock.record("cfp_fp", 28.0)              # 13,000 pairs in 40 s so far
    assert second.left_s == pytest.approx(6000 * 40 / 13000)
    assert clock.record("test_agedb", 10.0).left_s == 0.0
    assert first.line() == ("virface epoch 3/6 evaluated lfw (1/3): 6,000 pairs in 12.0 s, 500 pairs/s | "
                            "evaluation 0:26 left")


def test_an_evaluation_progress_file_sits_beside_the_step_progress_file(tmp_path):
    assert read_eval_progress(str(tmp_path)) == []
    step = StepProgress("virface", 1, 4, 20, 40, 12.5, 300.0, 9.0, 99.0)
    lfw, cfp = (EvalProgress("virface", 1, 4, name, k, 2, 600, 1.5, 1.5) for k, name in ((1, "lfw"), (2, "cfp_fp")))
    write_progress(str(tmp_path), step)
    write_progress(str(tmp_path), lfw)
    write_progress(str(tmp_path), cfp)
    # Every set of the epoch stays until the next epoch's first: a reader misses none.
    assert read_progress(str(tmp_path)) == step and read_eval_progress(str(tmp_path)) == [lfw, cfp]
    next_epoch = EvalProgress("virface", 2, 4, "lfw", 1, 2, 600, 1.5, 1.5)
    write_progress(str(tmp_path), next_epoch)
    assert read_eval_progress(str(tmp_path)) == [next_epoch]


def test_a_progress_file_round_trips_and_a_missing_one_reads_as_none(tmp_path):
    assert read_progress(str(tmp_path)) is None
    p = StepProgress("virface", 1, 4, 20, 40, 12.5, 300.0, 9.0, 99.0)
    write_progress(str(tmp_path), p)
    assert read_progress(str(tmp_path)) == p


def test_the_stage_loop_reports_every_log_every_steps_and_at_the_end_of_an_epoch(tmp_path, tiny_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []
    config = TrainConfig(method="pretrain", arch="mobilefacenet_s", feat_len=16, label_batch_size=4,
                         steps_per_epoch=5, max_epoch=2, log_every=2, device="cpu")
    run_stage(config, str(tmp_path / "run"), data=tiny_data, on_progress=seen.append,
              tb_dir=str(tmp_path / "tb"))
    # Each epoch: its step reports, then one report per pair set scored.
    assert [(type(p).__name__, p.epoch) for p in seen] == [("StepProgress", 1)] * 3 + [("EvalProgress", 1)] \
        + [("StepProgress", 2)] * 3 + [("EvalProgress", 2)]
    evaluated = [p for p in seen if isinstance(p, EvalProgress)]
    seen = [p for p in seen if isinstance(p, StepProgress)]
    assert [(p.name, p.index, p.count, p.pairs, p.left_s) for p in evaluated] == [("tiny_pairs", 1, 1, 20, 0.0)] * 2
    assert all(p.seconds > 0 and p.pairs_per_s == 20 / p.seconds for p in evaluated)
    assert [(p.epoch, p.step, p.steps) for p in seen] == [(1, 2, 5), (1, 4, 5), (1, 5, 5),
                                                          (2, 2, 5), (2, 4, 5), (2, 5, 5)]
    assert all(p.stage == "pretrain" and p.max_epoch == 2 and p.samples_per_s > 0 for p in seen)
    # The last step of the run leaves only its evaluation, which this tiny run measured.
    assert seen[2].epoch_left_s == 0 and seen[-1].epoch_left_s == 0 and seen[-1].run_left_s < 5
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    # Per-step points use the global step (epoch 2's first report is step 5 + 2).
    assert [e.step for e in acc.Scalars("step/loss")] == [2, 4, 5, 7, 9, 10]


def test_log_every_zero_reports_nothing(tmp_path, tiny_data):
    seen = []
    config = TrainConfig(method="pretrain", arch="mobilefacenet_s", feat_len=16, label_batch_size=4,
                         steps_per_epoch=3, max_epoch=1, log_every=0, device="cpu", tensorboard=False)
    run_stage(config, str(tmp_path / "run"), data=tiny_data, on_progress=seen.append)
    assert seen == []
