"""No silent switch of data: a stage started from a checkpoint trained on other data than the
built-in synthetic faces takes the data the checkpoint records (and says so) or stops naming the
options to give; a run that has no validation pair sets says that best.pt follows the loss."""
import json
import logging
import os

import pytest

from virface.checkpoint import checkpoint_data
from virface.errors import ConfigError
from virface.train import main

FAST = ["--feat_len", "16", "--label_batch_size", "8", "--unlabel_batch_size", "4",
        "--steps_per_epoch", "1", "--max_epoch", "1", "--gen_num", "2", "--device", "cpu",
        "--no-tensorboard", "--loader-workers", "0"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A .rec of 8 identities, a meta list of unlabeled faces and a .bin pair set: user data."""
    from virface.data.synthetic import SyntheticSpec, build_synthetic, export_synthetic

    out = tmp_path_factory.mktemp("data")
    export_synthetic(build_synthetic(SyntheticSpec(image_size=16, n_labeled_ids=8, images_per_labeled_id=4,
                                                   n_unlabeled_ids=12, n_val_ids=8, val_pairs=40)), str(out))
    return {"labeled": str(out / "labeled_rec"), "unlabeled": str(out / "unlabeled_folder" / "meta.txt"),
            "val": str(out / "val" / "synth_cfp_fp.bin")}


def test_a_stage_from_a_checkpoint_trained_on_user_data_takes_that_data_and_says_so(exported, tmp_path, caplog):
    run = tmp_path / "runs"
    data = ["--labeled", exported["labeled"], "--unlabeled", exported["unlabeled"],
            "--val", f"cfp_fp={exported['val']}", "--input-size", "16"]
    assert main(["--method", "pretrain", "--arch", "mobilefacenet_s", "--snapshot_prefix", str(run / "pre"),
                 *FAST, *data]) == 0
    caplog.set_level(logging.INFO, logger="virface")
    # No data option: the reference's chain command as a user types it after pretraining.
    assert main(["--method", "generator", "--pretrained_file", str(run / "pre" / "best.pt"),
                 "--snapshot_prefix", str(run / "gen"), *FAST]) == 0
    said = [r.getMessage() for r in caplog.records if "uses the data it records" in r.getMessage()]
    assert said and f"--labeled {exported['labeled']}" in said[0] and f"--val cfp_fp={exported['val']}" in said[0]
    generator = json.loads((run / "gen" / "config.json").read_text())
    assert (generator["labeled"], generator["unlabeled"]) == (exported["labeled"], exported["unlabeled"])
    assert generator["num_ids"] == 8 and generator["synthetic"] == {}
    # The generator recorded the unlabeled faces it did not read, so virface finds them too.
    assert main(["--method", "virface", "--pretrained_file", str(run / "gen" / "best.pt"),
                 "--snapshot_prefix", str(run / "vf"), *FAST]) == 0
    metrics = json.loads((run / "vf" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "cfp_fp_acc" in metrics and "synth_cfp_fp_acc" not in metrics

    # The search started from that checkpoint does the same, before anything is checked.
    from virface.search.runner import SearchOptions, adopt_upstream_data

    lines = []
    options = adopt_upstream_data(SearchOptions(stage="virface", from_checkpoint=str(run / "gen" / "best.pt"),
                                                storage=str(tmp_path / "exp")), "virface", lines.append)
    assert options.data["labeled"] == exported["labeled"] and options.data["val"] == {"cfp_fp": exported["val"]}
    assert lines == [f"no data options were given, and {run / 'gen' / 'best.pt'} was trained on other data "
                     f"than the built-in synthetic faces: searching on the data it records: --labeled "
                     f"{exported['labeled']} --unlabeled {exported['unlabeled']} --val cfp_fp={exported['val']}"]


def state_trained_on(**data):
    return {"stage": "pretrain", "config": {"labeled": None, "val": {}, "test": {}, **data}}


def test_recorded_data_that_is_not_here_is_an_error_naming_the_options(tmp_path):
    state = state_trained_on(labeled=str(tmp_path / "gone.rec"), unlabeled=str(tmp_path / "gone.txt"))
    with pytest.raises(ConfigError) as err:
        checkpoint_data({"method": "virclass", "labeled": None}, state, "pre/best.pt")
    message = str(err.value)
    assert "pre/best.pt was trained on other data than the built-in synthetic faces" in message
    assert f"not found here: labeled {tmp_path / 'gone.rec'}, unlabeled {tmp_path / 'gone.txt'}" in message
    assert message.endswith("Give the data explicitly: --labeled PATH (the identities it was trained on) "
                            "--unlabeled PATH --val NAME=PATH")


def test_a_stage_that_needs_unlabeled_faces_the_checkpoint_does_not_record_is_an_error(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"")
    state = state_trained_on(labeled=str(tmp_path / "train.rec"))
    with pytest.raises(ConfigError, match="stage virface needs unlabeled data, and the checkpoint records none"):
        checkpoint_data({"method": "virface"}, state, "gen/best.pt")
    # pretrain -> baseline reads no unlabeled faces: the labeled data is enough.
    assert checkpoint_data({"method": "baseline"}, state, "p.pt")["labeled"] == str(tmp_path / "train.rec")


def test_data_given_or_a_synthetic_checkpoint_changes_nothing(tmp_path):
    (tmp_path / "a.rec").write_bytes(b"")
    assert checkpoint_data({"method": "virclass", "labeled": "/mine"}, state_trained_on(labeled=str(tmp_path / "a.rec")),
                           "p.pt") == {}
    assert checkpoint_data({"method": "virclass"}, state_trained_on(synthetic={"n_labeled_ids": 8}), "p.pt") == {}


def test_pair_sets_given_are_kept_and_the_recorded_ones_fill_only_what_is_not_given(tmp_path):
    for name in ("a.rec", "lfw.bin", "mine.bin", "agedb.bin"):
        (tmp_path / name).write_bytes(b"")
    state = state_trained_on(labeled=str(tmp_path / "a.rec"), val={"lfw": str(tmp_path / "lfw.bin")},
                             test={"agedb": str(tmp_path / "agedb.bin")})
    adopted = checkpoint_data({"method": "baseline", "val": {"mine": str(tmp_path / "mine.bin")}}, state, "p.pt")
    assert adopted["val"] == {"mine": str(tmp_path / "mine.bin")}
    assert adopted["test"] == {"agedb": str(tmp_path / "agedb.bin")}


def test_a_run_without_validation_pairs_says_at_start_that_best_follows_the_loss(exported, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="virface")
    assert main(["--method", "pretrain", "--arch", "mobilefacenet_s", "--snapshot_prefix", str(tmp_path / "r"),
                 *FAST, "--labeled", exported["labeled"], "--input-size", "16"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    warning = "pretrain: no validation pair sets (--val): best.pt will be the epoch with the lowest training loss"
    assert any(m.startswith(warning) for m in messages)
    # Said before the data is read, not at the end.
    assert min(i for i, m in enumerate(messages) if m.startswith(warning)) < \
        min(i for i, m in enumerate(messages) if "reading the data" in m)
    best = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "best_loss" in best


def test_which_runs_select_best_pt_by_the_training_loss():
    from virface.config import TrainConfig
    from virface.stages import loss_selects_best

    assert loss_selects_best(TrainConfig(method="pretrain", eval=False))
    assert not loss_selects_best(TrainConfig(method="pretrain"))                  # synthetic pair sets
    assert loss_selects_best(TrainConfig(method="virclass", labeled="/d", unlabeled="/u"))
    assert not loss_selects_best(TrainConfig(method="virclass", labeled="/d", unlabeled="/u", val={"lfw": "/l"}))
    assert not loss_selects_best(TrainConfig(method="generator", labeled="/d"))   # gen_loss by design
    assert not loss_selects_best(TrainConfig(method="pretrain", labeled="/d", best_metric="loss"))
