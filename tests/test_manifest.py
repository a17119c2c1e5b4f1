"""Stage manifests (best.json) and the plan of which stages a search runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from virface.errors import CheckpointError, ConfigError, StagePreconditionError
from virface.search import manifest as manifest_module
from virface.search.manifest import (
    ManifestError,
    StageManifest,
    manifest_path,
    plan_chain,
    read_manifest,
    upstream_checkpoint,
    upstream_manifest,
    write_manifest,
)
from virface.stage_table import stage_chain

EXPERIMENT = "exp"


def make_checkpoint(tmp_path: Path, name: str = "ckpt.pt") -> str:
    path = tmp_path / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return str(path)


def make_manifest(tmp_path: Path, stage: str = "pretrain", **changes) -> StageManifest:
    values = dict(stage=stage, experiment=EXPERIMENT, trial_id="a1b2", config={"lr": 0.1, "m": 0.5},
                  metric_name="synth_cfp_fp_acc", metric_value=0.875, metric_mode="max",
                  checkpoint=make_checkpoint(tmp_path, f"{stage}.pt"), upstream=None,
                  created="2025-01-02T03:04:05+00:00")
    values.update(changes)
    return StageManifest(**values)


def finish_stage(storage: Path, stage: str) -> Path:
    """Write the manifest a finished search of ``stage`` leaves behind."""
    path = manifest_path(storage, EXPERIMENT, stage)
    write_manifest(make_manifest(storage, stage), path)
    return path


def write_raw(tmp_path: Path, data) -> Path:
    path = tmp_path / "best.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Chain and paths


def test_stage_chain_walks_up_to_pretrain():
    assert stage_chain("pretrain") == ["pretrain"]
    assert stage_chain("generator") == ["pretrain", "generator"]
    assert stage_chain("virclass") == ["pretrain", "virclass"]
    assert stage_chain("virface") == ["pretrain", "generator", "virface"]
    with pytest.raises(ConfigError, match="stage: 'virfac' is not one of"):
        stage_chain("virfac")


def test_manifest_path_layout(tmp_path):
    assert manifest_path(tmp_path, "exp", "generator") == tmp_path / "exp" / "generator" / "best.json"
    assert manifest_path("relative", "exp", "pretrain").is_absolute()


# ---------------------------------------------------------------------------------------------
# Writing and reading


def test_manifest_round_trip(tmp_path):
    m = make_manifest(tmp_path, "generator", upstream="/somewhere/pretrain/best.json")
    path = write_manifest(m, tmp_path / "new" / "folders" / "best.json")
    assert read_manifest(path) == m
    assert json.loads(path.read_text())["metric_value"] == 0.875


def test_the_run_size_overrides_are_recorded_only_when_given(tmp_path):
    plain = make_manifest(tmp_path, "pretrain")
    assert "overrides" not in json.loads(write_manifest(plain, tmp_path / "a" / "best.json").read_text())
    given = make_manifest(tmp_path, "pretrain")
    given.overrides = {"max_epoch": 30, "seed": 2}
    path = write_manifest(given, tmp_path / "b" / "best.json")
    assert json.loads(path.read_text())["overrides"] == {"max_epoch": 30, "seed": 2}
    assert read_manifest(path).overrides == {"max_epoch": 30, "seed": 2}


def test_a_generator_manifest_carries_its_instance_figures_into_the_stage_table(tmp_path):
    from virface.search.report import format_table

    figures = {"vi_draw_cos": 0.971, "vi_real_cos": 0.913, "vi_identity_keep": -0.017, "vi_w_pull": 0.042,
               "vi_own_class_share": 0.009}
    m = make_manifest(tmp_path, "generator", metric_name="vi_identity_keep", metric_value=-0.017,
                      instance_metrics=figures)
    path = write_manifest(m, tmp_path / "generator" / "best.json")
    assert read_manifest(path).instance_metrics == figures
    assert ("instances (held-out pairs, chosen epoch): identity keep -0.017, draw cos 0.971 (real "
            "same-identity cos 0.913), nearest-W pull +0.042, own class wins 0.9 %") in format_table(
        "generator", "vi_identity_keep", [], manifest=read_manifest(path), manifest_path=str(path))
    # A stage without instances writes no such key, and its table no such line.
    plain = make_manifest(tmp_path)
    assert "instance_metrics" not in plain.to_dict()
    assert "instances" not in format_table("pretrain", "synth_cfp_fp_acc", [], manifest=plain, manifest_path="x")
    with pytest.raises(ManifestError, match="instance_metrics: .* must be a JSON object"):
        read_manifest(write_raw(tmp_path, {**m.to_dict(), "instance_metrics": [0.1]}))


def test_created_defaults_to_an_iso_utc_time(tmp_path):
    values = make_manifest(tmp_path).to_dict()
    del values["created"]
    assert StageManifest(**values).created.endswith("+00:00")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "pretrain" / "best.json"
    write_manifest(make_manifest(tmp_path, metric_value=0.5), path)
    write_manifest(make_manifest(tmp_path, metric_value=0.75), path)
    assert os.listdir(path.parent) == ["best.json"]
    assert read_manifest(path).metric_value == 0.75


def test_failed_write_keeps_the_old_manifest_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "pretrain" / "best.json"
    write_manifest(make_manifest(tmp_path, metric_value=0.5), path)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(manifest_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(make_manifest(tmp_path, metric_value=0.75), path)
    assert os.listdir(path.parent) == ["best.json"]
    assert read_manifest(path).metric_value == 0.5


def test_write_rejects_a_relative_checkpoint(tmp_path):
    with pytest.raises(ManifestError, match="checkpoint: 'ckpt.pt' must be an absolute path"):
        write_manifest(make_manifest(tmp_path, checkpoint="ckpt.pt"), tmp_path / "best.json")


def test_relative_checkpoint_in_a_hand_written_manifest_is_next_to_it(tmp_path):
    (tmp_path / "mine.pt").write_bytes(b"weights")
    data = make_manifest(tmp_path).to_dict()
    data["checkpoint"] = "mine.pt"
    assert read_manifest(write_raw(tmp_path, data)).checkpoint == str(tmp_path / "mine.pt")


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(ManifestError, match=rf"^{tmp_path}/best.json: manifest not found"):
        read_manifest(tmp_path / "best.json")


def test_invalid_json_names_file_and_line(tmp_path):
    path = write_raw(tmp_path, '{\n  "stage": "pretrain",\n  oops\n}\n')
    with pytest.raises(ManifestError, match=rf"^{path}:3: invalid JSON"):
        read_manifest(path)


def test_non_object_json_is_rejected(tmp_path):
    path = write_raw(tmp_path, "[1, 2]")
    with pytest.raises(ManifestError, match=rf"^{path}: expected a JSON object"):
        read_manifest(path)


def test_missing_key_is_named(tmp_path):
    data = make_manifest(tmp_path).to_dict()
    del data["checkpoint"], data["trial_id"]
    path = write_raw(tmp_path, data)
    with pytest.raises(ManifestError, match=rf"^{path}: missing key\(s\) \['trial_id', 'checkpoint'\]"):
        read_manifest(path)


def test_unknown_key_is_named(tmp_path):
    data = {**make_manifest(tmp_path).to_dict(), "chekpoint": "x"}
    path = write_raw(tmp_path, data)
    with pytest.raises(ManifestError, match=rf"^{path}: unknown key\(s\) \['chekpoint'\]"):
        read_manifest(path)


@pytest.mark.parametrize("key, value, expected", [
    ("metric_mode", "maximize", "metric_mode: 'maximize' must be one of \\['max', 'min'\\]"),
    ("metric_value", "0.8", "metric_value: '0.8' must be a finite number"),
    ("stage", "finetune", "stage: 'finetune' must be one of"),
    ("config", [1], "config: \\[1\\] must be a JSON object"),
    ("trial_id", "", "trial_id: '' must be a non-empty string"),
    ("metric_se", True, "metric_se: True must be a finite number >= 0 or null"),
    ("metric_se", "0.01", "metric_se: '0.01' must be a finite number >= 0 or null"),
    ("upstream", 3, "upstream: 3 must be a string or null"),
    ("created", ["x"], "created: \\['x'\\] must be a string or null"),
    ("test_metrics", [], "test_metrics: \\[\\] must be a JSON object of metric -> value"),
    ("lineage", "pretrain:a", "lineage: 'pretrain:a' must be a list of 'stage:trial_id'"),
    ("carried", {}, "carried: \\{\\} must be a list of carried trials"),
    ("trial_upstreams", [], "trial_upstreams: \\[\\] must be a JSON object of trial id -> upstream trial id"),
    ("pareto", [], "pareto: \\[\\] must be a JSON object or null"),
    ("instance_metrics", 1, "instance_metrics: 1 must be a JSON object of metric -> value"),
    ("overrides", "x", "overrides: 'x' must be a JSON object of option -> value"),
    ("carried", [["a", "b"]], "carried\\[0\\]: \\['a', 'b'\\] must be an object with a trial_id and a checkpoint"),
])
def test_bad_value_is_named_with_its_key(tmp_path, key, value, expected):
    data = {**make_manifest(tmp_path).to_dict(), key: value}
    path = write_raw(tmp_path, data)
    with pytest.raises(ManifestError, match=rf"^{path}: {expected}"):
        read_manifest(path)


def test_checkpoint_that_does_not_exist_is_named(tmp_path):
    m = make_manifest(tmp_path)
    path = write_manifest(m, tmp_path / "best.json")
    os.remove(m.checkpoint)
    with pytest.raises(ManifestError, match=rf"^{path}: checkpoint: {m.checkpoint} does not exist"):
        read_manifest(path)


# ---------------------------------------------------------------------------------------------
# Planning the chain


def test_plan_with_nothing_on_disk_runs_the_whole_chain(tmp_path):
    assert plan_chain("virface", tmp_path, EXPERIMENT, None) == ["pretrain", "generator", "virface"]
    assert plan_chain("virclass", tmp_path, EXPERIMENT, None) == ["pretrain", "virclass"]
    assert plan_chain("pretrain", tmp_path, EXPERIMENT, None) == ["pretrain"]


def test_plan_reuses_a_finished_pretrain(tmp_path):
    finish_stage(tmp_path, "pretrain")
    assert plan_chain("virface", tmp_path, EXPERIMENT, None) == ["generator", "virface"]
    assert plan_chain("virclass", tmp_path, EXPERIMENT, None) == ["virclass"]


def test_plan_stops_at_the_nearest_finished_upstream(tmp_path):
    finish_stage(tmp_path, "generator")
    assert plan_chain("virface", tmp_path, EXPERIMENT, None) == ["virface"]


def test_plan_always_runs_the_asked_stage_even_if_it_finished_before(tmp_path):
    finish_stage(tmp_path, "pretrain")
    assert plan_chain("pretrain", tmp_path, EXPERIMENT, None) == ["pretrain"]


def test_plan_with_a_user_checkpoint_runs_only_the_asked_stage(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    assert plan_chain("virface", tmp_path, EXPERIMENT, ckpt) == ["virface"]


def test_plan_is_per_experiment(tmp_path):
    finish_stage(tmp_path, "pretrain")
    assert plan_chain("generator", tmp_path, "other", None) == ["pretrain", "generator"]


def test_plan_fails_early_on_a_broken_upstream_manifest(tmp_path):
    path = finish_stage(tmp_path, "pretrain")
    path.write_text("{not json")
    with pytest.raises(ManifestError, match=rf"^{path}:1: invalid JSON"):
        plan_chain("virface", tmp_path, EXPERIMENT, None)


def test_user_checkpoint_must_exist_and_needs_an_upstream(tmp_path):
    with pytest.raises(CheckpointError, match=r"from_checkpoint: .*missing\.pt does not exist"):
        plan_chain("virface", tmp_path, EXPERIMENT, str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="stage pretrain has no upstream stage"):
        plan_chain("pretrain", tmp_path, EXPERIMENT, make_checkpoint(tmp_path))


# ---------------------------------------------------------------------------------------------
# The checkpoint a stage starts from


def test_pretrain_starts_from_scratch(tmp_path):
    path, source = upstream_checkpoint("pretrain", tmp_path, EXPERIMENT, None)
    assert (path, source) == (None, "none: pretrain starts from scratch")


def test_stage_starts_from_the_upstream_best_checkpoint(tmp_path):
    manifest_file = finish_stage(tmp_path, "generator")
    path, source = upstream_checkpoint("virface", tmp_path, EXPERIMENT, None)
    assert path == str(tmp_path / "checkpoints" / "generator.pt")
    assert "a1b2" in source and "synth_cfp_fp_acc=0.875" in source and str(manifest_file) in source


def test_user_checkpoint_replaces_the_upstream(tmp_path):
    finish_stage(tmp_path, "pretrain")
    ckpt = make_checkpoint(tmp_path, "mine.pt")
    path, source = upstream_checkpoint("virclass", tmp_path, EXPERIMENT, ckpt)
    assert path == ckpt and source == f"user checkpoint {ckpt}"


def test_missing_upstream_manifest_is_a_precondition_error(tmp_path):
    with pytest.raises(StagePreconditionError, match=r"stage generator starts from the best "
                                                     r"pretrain checkpoint, but .*pretrain/best\.json"):
        upstream_checkpoint("generator", tmp_path, EXPERIMENT, None)


def test_manifest_of_the_wrong_stage_is_rejected(tmp_path):
    path = manifest_path(tmp_path, EXPERIMENT, "generator")
    write_manifest(make_manifest(tmp_path, "virclass"), path)
    with pytest.raises(ManifestError, match=rf"^{path}: stage: 'virclass' but the file is where "
                                            r"stage generator's manifest belongs"):
        upstream_checkpoint("virface", tmp_path, EXPERIMENT, None)


def test_the_chosen_trials_accuracies_carry_their_standard_errors_into_the_manifest_and_table(tmp_path):
    from virface.search.report import format_table

    path = tmp_path / "best.json"
    write_manifest(make_manifest(tmp_path, metric_se=0.0135,
                                 test_metrics={"test_lfw_acc": 0.9, "test_lfw_acc_se": 0.0122}), path)
    manifest = read_manifest(path)
    assert manifest.metric_se == 0.0135 and manifest.test_metrics["test_lfw_acc_se"] == 0.0122
    table = format_table("pretrain", "synth_cfp_fp_acc", [], manifest=manifest, manifest_path=str(path))
    assert "best: trial a1b2 synth_cfp_fp_acc=0.8750 ± 0.0135 (SE over pairs" in table
    assert "test_lfw_acc=0.9000 ± 0.0122" in table
    # A manifest written before the field existed reads as it did, without one.
    write_manifest(make_manifest(tmp_path), path)
    assert "metric_se" not in json.loads(path.read_text()) and read_manifest(path).metric_se is None
    data = json.loads(path.read_text())
    with pytest.raises(ManifestError, match="metric_se: -1 must be a finite number >= 0 or null"):
        read_manifest(write_raw(tmp_path, {**data, "metric_se": -1}))


def test_the_table_says_in_words_which_trials_the_pairs_cannot_tell_from_the_best(tmp_path):
    from virface.search.report import TrialRow, format_table

    path = tmp_path / "best.json"
    write_manifest(make_manifest(tmp_path, metric_se=0.01), path)   # best a1b2 at 0.875
    manifest = read_manifest(path)
    rows = [TrialRow("a1b2", {}, 0.875, 2, "completed"),
            TrialRow("near", {}, 0.875 - 0.02, 2, "completed"),     # < 1.96·√2·0.01 = 0.0277
            TrialRow("far", {}, 0.875 - 0.03, 2, "completed"),
            TrialRow("broken", {}, None, 0, "failed", error="x")]
    table = format_table("pretrain", "synth_cfp_fp_acc", rows, manifest=manifest, manifest_path=str(path))
    assert "within noise of the best: near (closer than 1.96·√2·SE = 0.0277)" in table
    # Trials clearly apart, or a manifest without an SE, add no such line.
    apart = [r for r in rows if r.trial_id != "near"]
    assert "within noise" not in format_table("pretrain", "synth_cfp_fp_acc", apart, manifest=manifest,
                                              manifest_path=str(path))
    write_manifest(make_manifest(tmp_path), path)
    assert "within noise" not in format_table("pretrain", "synth_cfp_fp_acc", rows,
                                              manifest=read_manifest(path), manifest_path=str(path))


def test_a_zero_standard_error_and_null_optional_strings_are_valid(tmp_path):
    data = {**make_manifest(tmp_path).to_dict(), "metric_se": 0, "upstream": None, "created": None,
            "pareto": None}
    manifest = read_manifest(write_raw(tmp_path, data))
    assert manifest.metric_se == 0 and manifest.upstream is None


def test_a_manifest_that_is_no_json_object_names_its_type(tmp_path):
    path = tmp_path / "best.json"
    path.write_text("[1, 2]")
    with pytest.raises(ManifestError, match=r"got list$"):
        read_manifest(path)


def test_the_manifest_file_is_indented_json_in_the_schemas_key_order(tmp_path):
    """People read best.json: one key per line, 2-space indent, the fields in their declared order."""
    manifest = make_manifest(tmp_path)
    path = write_manifest(manifest, tmp_path / "best.json")
    text = Path(path).read_text()
    assert text == json.dumps(manifest.to_dict(), indent=2) + "\n"
    assert list(json.loads(text)) == list(manifest.to_dict())[:len(json.loads(text))]
    assert text.splitlines()[1].startswith('  "stage": ')


def test_writing_a_manifest_of_an_unknown_stage_names_the_file_and_the_stages(tmp_path):
    path = tmp_path / "best.json"
    with pytest.raises(ManifestError, match=rf"^{path}: stage: 'finetune' is not one of \['pretrain', "):
        write_manifest(make_manifest(tmp_path, stage="finetune"), path)
    assert not path.exists()


def test_from_checkpoint_on_the_first_stage_names_the_stages_it_applies_to(tmp_path):
    with pytest.raises(ConfigError, match=r"stage pretrain has no upstream stage to replace; it applies to "
                                          r"\['generator', "):
        upstream_checkpoint("pretrain", tmp_path, EXPERIMENT, str(tmp_path / "x.pt"))


def test_a_stage_reads_the_manifest_of_its_own_upstream_stage_and_none_otherwise(tmp_path):
    # Where carried trials and lineage come from: virface reads the generator's manifest, not
    # pretrain's; pretrain has none; a user checkpoint replaces it; nothing searched yet: none.
    assert upstream_manifest("virface", tmp_path, EXPERIMENT, None) is None
    finish_stage(tmp_path, "pretrain")
    generator = make_manifest(tmp_path, "generator", trial_id="g1")
    write_manifest(generator, manifest_path(tmp_path, EXPERIMENT, "generator"))
    assert upstream_manifest("virface", tmp_path, EXPERIMENT, None) == generator
    assert upstream_manifest("virclass", tmp_path, EXPERIMENT, None).trial_id == "a1b2"
    assert upstream_manifest("pretrain", tmp_path, EXPERIMENT, None) is None
    assert upstream_manifest("virface", tmp_path, EXPERIMENT, make_checkpoint(tmp_path, "mine.pt")) is None
    assert upstream_manifest("virface", tmp_path, "another", None) is None


def test_a_manifest_may_name_a_checkpoint_in_object_storage(tmp_path, monkeypatch):
    uri = "s3://bucket/runs/exp/train_pretrain_a1b2/checkpoint_000001/checkpoint.pt"
    path = tmp_path / "best.json"
    write_manifest(make_manifest(tmp_path, checkpoint=uri), path)        # not refused as relative
    assert json.loads(path.read_text())["checkpoint"] == uri
    # Read back as the URI (the object's existence asked of the storage), not as a path
    # relative to the manifest's folder.
    monkeypatch.setattr(manifest_module.storage, "exists", lambda where: where == uri)
    assert read_manifest(path).checkpoint == uri


def test_a_user_checkpoint_is_made_absolute_and_a_uri_is_kept(tmp_path, monkeypatch):
    make_checkpoint(tmp_path, "mine.pt")
    monkeypatch.chdir(tmp_path)
    path, _ = upstream_checkpoint("virclass", tmp_path, EXPERIMENT, os.path.join("checkpoints", "mine.pt"))
    assert path == str(tmp_path / "checkpoints" / "mine.pt")
    uri = "s3://bucket/mine.pt"
    monkeypatch.setattr(manifest_module.storage, "exists", lambda where: where == uri)
    assert upstream_checkpoint("virclass", tmp_path, EXPERIMENT, uri)[0] == uri
