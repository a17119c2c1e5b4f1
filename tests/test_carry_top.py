"""--carry_top K: a stage passes its K best trials on, the next stage searches which one to start
from, and the manifests record the lineage (no Ray here; tests/test_search_ray.py runs a chain)."""
from __future__ import annotations

import json

import pytest

from virface.errors import ConfigError
from virface.search.cli import build_parser, options_from_args
from virface.search.manifest import (ManifestError, StageManifest, carried_choices, manifest_lineage,
                                     read_manifest, write_manifest)
from virface.search.runner import SearchOptions, with_upstream_parameter
from virface.search.space import default_space_path, load_search_space
from virface.search.trial import TrialSetup, trial_train_config


def test_carry_top_is_an_option_in_both_spellings_and_defaults_to_the_plain_chain(tmp_path):
    parse = lambda *argv: options_from_args(build_parser().parse_args([*argv, "--storage", str(tmp_path)]))
    assert parse().carry_top == 1
    assert parse("--carry-top", "3").carry_top == 3 and parse("--carry_top", "2").carry_top == 2
    with pytest.raises(ConfigError, match="carry_top: 0 must be >= 1"):
        SearchOptions(carry_top=0, storage=str(tmp_path))


def test_the_upstream_parameter_comes_first_and_starts_from_the_best_upstream():
    space = with_upstream_parameter(load_search_space(default_space_path("baseline"), "baseline"), ["best", "second"])
    assert space.parameter_names[0] == "upstream" and list(space.parameters[0].distribution.choices) == ["best", "second"]
    assert space.points_to_evaluate()[0]["upstream"] == "best"


def test_a_trial_starts_from_the_checkpoint_its_upstream_parameter_names():
    setup = TrialSetup(stage="baseline", base_config={"max_epoch": 1}, upstream_checkpoint="/best.pt",
                       tb_root="/tb", train_storage="/s", metric="m", mode="max",
                       upstream_choices={"best": "/best.pt", "second": "/second.pt"})
    config = trial_train_config(setup, {"upstream": "second", "lr": 0.01})
    assert config["pretrained_file"] == "/second.pt" and "upstream" not in config and config["lr"] == 0.01
    # Without the parameter (--carry_top 1): the one upstream checkpoint, as before.
    assert trial_train_config(setup, {"lr": 0.01})["pretrained_file"] == "/best.pt"


def manifest(tmp_path, **changes):
    checkpoint = tmp_path / "c.pt"
    checkpoint.write_bytes(b"w")
    return StageManifest(**{"stage": "pretrain", "experiment": "e", "trial_id": "a", "config": {},
                            "metric_name": "acc", "metric_value": 0.9, "metric_mode": "max",
                            "checkpoint": str(checkpoint), **changes})


def test_a_plain_manifest_is_written_as_before_and_a_carrying_one_round_trips(tmp_path):
    plain = manifest(tmp_path, lineage=["pretrain:a"]).to_dict()
    assert not {"carried", "trial_upstreams", "pareto"} & set(plain)
    carried = [{"trial_id": "a", "checkpoint": str(tmp_path / "c.pt"), "metric_value": 0.9, "lineage": ["pretrain:a"]},
               {"trial_id": "b", "checkpoint": str(tmp_path / "c.pt"), "metric_value": 0.8, "lineage": ["pretrain:b"]}]
    path = write_manifest(manifest(tmp_path, carried=carried, lineage=["pretrain:a"]), tmp_path / "best.json")
    again = read_manifest(path)
    assert again.carried == carried and carried_choices(again) == {"a": carried[0], "b": carried[1]}
    assert manifest_lineage(again) == ["pretrain:a"]
    # One carried trial is no choice; a manifest from before lineage stands for itself.
    assert carried_choices(manifest(tmp_path, carried=carried[:1])) == {}
    assert manifest_lineage(manifest(tmp_path)) == ["pretrain:a"]


def test_a_carried_entry_without_a_checkpoint_is_a_manifest_error(tmp_path):
    data = {**manifest(tmp_path).to_dict(), "carried": [{"trial_id": "a"}]}
    (tmp_path / "best.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"carried\[0\]: .* must be an object with a trial_id and a checkpoint"):
        read_manifest(tmp_path / "best.json")


def test_a_carried_checkpoint_that_is_gone_is_named_with_its_trial(tmp_path):
    gone = str(tmp_path / "gone.pt")
    carried = [{"trial_id": "a", "checkpoint": str(tmp_path / "c.pt"), "metric_value": 0.9},
               {"trial_id": "b", "checkpoint": gone, "metric_value": 0.8}]
    with pytest.raises(ManifestError, match=rf"^stage pretrain: carried trial b: checkpoint {gone} does "
                                            r"not exist \(moved or deleted\?\)$"):
        carried_choices(manifest(tmp_path, carried=carried))
