"""The command lines of virface-train and virface-search: built from the config dataclasses,
every default shown, both spellings accepted, bad NAME=VALUE options named."""
import dataclasses
import json

import pytest

from virface.config import GROUP_DATA, TrainConfig, config_field_names
from virface.errors import ConfigError
from virface.search import cli as search_cli
from virface.search.runner import SearchOptions, resolve_storage
from virface.train import build_parser, config_from_args


def option_strings(parser):
    return {s for action in parser._actions for s in action.option_strings}


def test_every_train_config_field_is_an_option_of_virface_train_in_both_spellings():
    options = option_strings(build_parser())
    for name in config_field_names():
        assert f"--{name}" in options, name
        assert f"--{name.replace('_', '-')}" in options, name


def test_virface_search_takes_every_search_option_and_every_data_option():
    options = option_strings(search_cli.build_parser())
    # Fields without help text are set by code (data, a comparison's budget), not the command line.
    names = [f.name for f in dataclasses.fields(SearchOptions) if "help" in f.metadata]
    assert "stage" in names and "seeds" in names
    for name in names + config_field_names(GROUP_DATA):
        assert f"--{name}" in options and f"--{name.replace('_', '-')}" in options, name


@pytest.mark.parametrize("parser", [build_parser(), search_cli.build_parser()], ids=["train", "search"])
def test_help_shows_a_default_for_every_option_and_one_spelling(parser):
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert "default" in (action.help or ""), action.option_strings
    listing = text.split("options:")[-1]          # after the description
    assert "--label-batch-size" not in listing and "--num-samples" not in listing
    # The defaults shown are TrainConfig's own.
    if "--lr" in option_strings(parser):
        flat = " ".join(text.split())
        assert "--lr X SGD learning rate (default: 0.1)" in flat
        assert "(default: 8 12 15 18)" in flat and "(default: 10)" in flat


def test_both_spellings_give_the_same_config():
    snake = config_from_args(build_parser().parse_args(
        ["--method", "pretrain", "--label_batch_size", "16", "--max_epoch", "3", "--input_size", "32"]))
    kebab = config_from_args(build_parser().parse_args(
        ["--method", "pretrain", "--label-batch-size", "16", "--max-epoch", "3", "--input-size", "32"]))
    assert snake == kebab and snake.label_batch_size == 16 and snake.input_size == 32


def test_a_pair_set_name_given_twice_or_empty_is_refused(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "pretrain", "--val", "v=/a.bin", "--val", "v=/b.bin"])
    assert "'v' is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "pretrain", "--val", "=/a.bin"])
    assert "the name before '=' is empty" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="pair-set name 'a b'"):
        TrainConfig(val={"a b": "/x.bin"})


def test_search_options_take_data_options_into_data():
    args = search_cli.build_parser().parse_args(
        ["--stage", "virclass", "--labeled", "/d/train.rec", "--val", "lfw=/d/lfw.bin",
         "--num-samples", "3", "--gpus-per-worker", "0.25", "--storage", "/tmp/exp"])
    options = search_cli.options_from_args(args)
    assert options.stage == "virclass" and options.num_samples == 3 and options.gpus_per_worker == 0.25
    assert options.data == {"labeled": "/d/train.rec", "val": {"lfw": "/d/lfw.bin"}}


def job_env(monkeypatch, working_dir):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    runtime_env = {"working_dir": working_dir} if working_dir else {}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": runtime_env}))


def test_a_relative_storage_inside_a_ray_job_with_a_working_dir_is_an_error(monkeypatch):
    job_env(monkeypatch, "gcs://_ray_pkg_abc.zip")
    with pytest.raises(ConfigError, match="--storage /a/path/every/node/shares"):
        resolve_storage(None)
    with pytest.raises(ConfigError, match="'results' is relative"):
        resolve_storage("results")
    assert resolve_storage("/shared/exp") == "/shared/exp"


def test_storage_outside_a_job_defaults_to_experiments_in_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage(None) == str(tmp_path / "experiments")
    job_env(monkeypatch, None)        # a job without a working dir runs where it was started
    assert resolve_storage("rel") == str(tmp_path / "rel")


def test_storage_is_a_path_or_a_uri_kept_as_given():
    assert resolve_storage("s3://bucket/experiments/") == "s3://bucket/experiments"
    with pytest.raises(ConfigError, match="compare.*not supported yet"):
        SearchOptions(storage="s3://bucket/experiments", compare="virface,baseline")


@pytest.mark.parametrize("entry_point", ["virface.train", "virface.search.cli", "virface.evaluate",
                                         "virface.export"])
def test_every_entry_point_prints_line_by_line_into_a_pipe_or_a_log_file(entry_point, monkeypatch):
    # `virface-search ... | tee search.log` shows each progress line as it is printed, not an
    # hour later: Python block-buffers an output that is not a terminal unless told otherwise.
    import importlib
    import io
    import sys

    out, err = (io.TextIOWrapper(io.BytesIO()) for _ in range(2))
    assert not out.line_buffering
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(SystemExit):
        importlib.import_module(entry_point).main(["--help"])
    assert out.line_buffering and err.line_buffering
