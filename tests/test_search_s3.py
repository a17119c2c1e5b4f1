"""Searches whose --storage is an S3 URI, end to end, against moto's S3 server on loopback: the
chain's records, checkpoints and TensorBoard runs land in the bucket, the next stage starts from
the previous stage's best checkpoint there, --list reads the bucket, and a driver killed with
SIGKILL resumes from what the bucket holds (its local copy deleted).

One S3 server for the module; the searches join the shared Ray head (conftest), whose processes
were started with the S3 test credentials."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import s3_server, start_search_until_a_trial_reports_epoch_2, write_space
from virface.checkpoint import load_checkpoint
from virface.search.cli import main as search_main
from virface.search.runner import SearchOptions, run_search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture
def ray_cluster(s3, connected_ray):
    # The shared Ray head's processes hold the S3 test credentials from their start (conftest).
    return connected_ray


def test_smoke_chain_on_s3_keeps_everything_in_the_bucket_and_chains_through_it(ray_cluster, s3, tmp_path, capsys):
    space = write_space(tmp_path, "virface",
                        resources={"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0})
    uri = s3.uri("chain")
    outcomes = run_search(SearchOptions(stage="virface", storage=uri, budget="smoke", space=space, quiet=True))
    assert [o.stage for o in outcomes] == ["pretrain", "generator", "virface"]
    assert all(o.manifest is not None for o in outcomes), [o.error for o in outcomes]

    keys = s3.keys("chain/default/")
    for stage in ("pretrain", "generator", "virface"):
        for record in ("best.json", "trials.json", "optuna.journal", "search_space.json"):
            assert f"chain/default/{stage}/{record}" in keys, (stage, record)
        # The trials' TensorBoard runs (events and HParams) and the stage's HParams config.
        runs = {k.split("/")[4] for k in keys if k.startswith(f"chain/default/{stage}/tb/{stage}_")}
        assert len(runs) == 1, runs
        assert any(re.search(rf"{stage}/tb/{stage}_\w+/events\.out\.tfevents", k) for k in keys)
    assert not any(k.endswith("driver.lock") for k in keys)            # released

    # The manifests name checkpoints in the bucket (Tune's for one-worker trials, Ray Train's for
    # the 2-rank virface trial), and each stage started from the one before it.
    manifests = {s: json.loads(s3.read(f"chain/default/{s}/best.json")) for s in ("pretrain", "generator", "virface")}
    for stage, m in manifests.items():
        assert m["checkpoint"].startswith(f"s3://{s3.bucket}/chain/default/"), m["checkpoint"]
        assert m["checkpoint"].endswith(f"?endpoint_override={s3.endpoint}&scheme=http")
        key = m["checkpoint"].split(s3.bucket + "/", 1)[1].split("?")[0]
        assert key in keys, key
    assert "/search_pretrain/" in manifests["pretrain"]["checkpoint"]
    assert "/train_virface_" in manifests["virface"]["checkpoint"]
    assert manifests["generator"]["upstream"] == manifests["pretrain"]["checkpoint"]
    assert manifests["virface"]["upstream"] == manifests["generator"]["checkpoint"]
    # What the trials loaded is what the bucket holds: the generator stage freezes the backbone,
    # so its weights are exactly pretrain's best epoch's; virface records where it started from.
    pre, gen, vf = (load_checkpoint(manifests[s]["checkpoint"]) for s in ("pretrain", "generator", "virface"))
    for name, value in pre["backbone"].items():
        assert torch.equal(value, gen["backbone"][name])
    assert gen["config"]["pretrained_file"] == manifests["pretrain"]["checkpoint"]
    assert vf["config"]["pretrained_file"] == manifests["generator"]["checkpoint"]

    # --list reads the bucket: a new local copy, the same three finished stages.
    shutil.rmtree(SearchOptions(storage=uri).storage)
    assert search_main(["--list", "--storage", uri]) == 0
    listed = capsys.readouterr().out
    assert f"experiments under s3://{s3.bucket}/chain?" in listed
    for stage in ("pretrain", "generator", "virface"):
        assert re.search(rf"{stage}\s+finished\s+1 trial\(s\)\s+best", listed), listed


def result_epochs(s3, prefix: str) -> dict[str, list[int]]:
    """Per trial, the epochs of its result.json in Tune's folder in the bucket."""
    epochs = {}
    for key in s3.keys(prefix):
        if key.endswith("/result.json"):
            rows = [json.loads(x) for x in s3.read(key).decode().splitlines() if x.strip()]
            epochs[rows[0]["trial_id"]] = [r["epoch"] for r in rows]
    return epochs


def test_a_driver_killed_mid_search_on_s3_resumes_from_the_bucket(ray_cluster, s3, tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    # 16 ids x 20 images in batches of 8: 40 steps an epoch, slow enough to be killed mid-run.
    space = write_space(tmp_path, "pretrain", scheduler={"type": "none"},
                        budget={"num_samples": 2, "max_concurrent_trials": 1},
                        fixed={"arch": "mobilefacenet_s", "max_epoch": 3, "label_batch_size": 8},
                        parameters={"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True,
                                           "default": 0.05}})
    uri = s3.uri("resume")
    cmd = [sys.executable, os.path.join(REPO, "tune", "run_search.py"), "--stage", "pretrain",
           "--space", space, "--storage", uri, "--address", ray_cluster,
           "--synthetic", "n_labeled_ids=16", "--synthetic", "images_per_labeled_id=20",
           "--synthetic", "n_unlabeled_ids=40", "--synthetic", "n_val_ids=16", "--synthetic", "val_pairs=100"]
    driver, first_trial = start_search_until_a_trial_reports_epoch_2(cmd)
    deadline = time.time() + 300
    # Kill once that trial's epoch-2 checkpoint is in the bucket and Tune's state there is newer.
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{s3.endpoint}")

    def modified(prefix):
        objects = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
        return max((o["LastModified"] for o in objects), default=None)

    checkpoint = f"resume/default/search_pretrain/pretrain_{first_trial}/checkpoint_000001/"
    while True:
        written = modified(checkpoint)
        state = modified("resume/default/search_pretrain/experiment_state-")
        if written is not None and state is not None and state > written:
            break
        assert time.time() < deadline, "the epoch-2 checkpoint never reached Tune's state in the bucket"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert "resume/default/pretrain/best.json" not in s3.keys("resume/")
    assert "resume/default/driver.lock" in s3.keys("resume/")          # the dead driver's
    # The bucket is the truth: the local copy of the records is gone before the resume.
    shutil.rmtree(SearchOptions(storage=uri).storage)

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    manifest = json.loads(s3.read("resume/default/pretrain/best.json"))
    assert manifest["config"]["max_epoch"] == 3
    epochs = result_epochs(s3, "resume/default/search_pretrain/")
    assert len(epochs) == 2 and all(max(e) == 3 for e in epochs.values()), epochs
    # The first trial was finished or continued from its checkpoint: it never started over.
    assert epochs[first_trial].count(1) == 1, epochs
    # The study (the journal in the bucket) agrees with Tune: both trials complete, once each.
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(s3.read("resume/default/pretrain/optuna.journal"))
    study = optuna.load_study(study_name="default-pretrain", storage=JournalStorage(JournalFileBackend(str(journal))))
    states = [t.state.name for t in study.trials]
    trials = json.loads(s3.read("resume/default/pretrain/trials.json"))["trials"]
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states, states
    assert sorted(round(t.value, 6) for t in study.trials if t.state.name == "COMPLETE") == \
        sorted(round(t["metric"], 6) for t in trials)
    assert max(t["metric"] for t in trials) == manifest["metric_value"]
    assert "resume/default/driver.lock" not in s3.keys("resume/")
