"""The Ray platform end to end: chained stage searches, failures, resume after a kill.

The searches join this test process's shared Ray head (conftest: 2 CPUs, the dashboard on
127.0.0.1, which Ray Train needs to clean up the placement groups of trials that Tune stops):
in-process through the module's connection, the drivers through --address.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import start_search_until_a_trial_reports_epoch_2, write_space

from virface.checkpoint import load_checkpoint
from virface.search.manifest import read_manifest
from virface.search.runner import SearchOptions, run_search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture
def ray_cluster(connected_ray):
    return connected_ray


def tb_scalars_and_hparams(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return set(acc.Tags()["scalars"]), acc.PluginTagToContent("hparams")


def test_smoke_chain_pretrain_generator_virface(ray_cluster, tmp_path):
    # Every trial in its Tune trial's process. (The same chain with the virface trial on 2 Ray
    # Train ranks: test_search_s3; multi-worker searches: the ASHA and resume tests below.)
    storage = tmp_path / "exp"
    outcomes = run_search(SearchOptions(stage="virface", storage=str(storage), budget="smoke", quiet=True))
    assert [o.stage for o in outcomes] == ["pretrain", "generator", "virface"]
    assert all(o.manifest is not None for o in outcomes), [o.error for o in outcomes]

    pre, gen, vf = (read_manifest(storage / "default" / s / "best.json")
                    for s in ("pretrain", "generator", "virface"))
    assert gen.upstream == pre.checkpoint and vf.upstream == gen.checkpoint
    # The generator stage freezes the backbone: its weights are exactly pretrain's best epoch.
    pre_state, gen_state = load_checkpoint(pre.checkpoint), load_checkpoint(gen.checkpoint)
    for key, value in pre_state["backbone"].items():
        assert torch.equal(value, gen_state["backbone"][key])
    vf_state = load_checkpoint(vf.checkpoint)
    assert vf_state["config"]["pretrained_file"] == gen.checkpoint
    # The model's shape is inherited, not searched; virface's also says what its generator draws.
    assert vf_state["model"] == {**pre_state["model"], "gen_residual": False, "gen_target": "class_centre"}
    assert vf.metric_name == "synth_cfp_fp_acc" and 0.0 <= vf.metric_value <= 1.0

    # The trials' runs are folders; the stage's HParams config files sit beside them.
    runs = [r for r in glob.glob(str(storage / "default" / "*" / "tb" / "*")) if os.path.isdir(r)]
    assert {os.path.basename(os.path.dirname(os.path.dirname(r))) for r in runs} == {"pretrain", "generator", "virface"}
    vf_run = [r for r in runs if "/virface/" in r][0]
    scalars, hparams = tb_scalars_and_hparams(vf_run)
    assert {"loss/loss", "loss/loss_vc", "loss/loss_vi", "val/synth_cfp_fp_acc", "train/lr",
            "train/samples_per_s"} <= scalars
    assert hparams, "the trial's HParams entry is missing"
    assert os.path.exists(storage / "default" / "virface" / "optuna.journal")


def test_failing_trial_is_reported_and_the_search_goes_on(ray_cluster, tmp_path):
    # The second trial's scale s overflows float32: infinite logits, a NaN loss, so that trial errors.
    space = write_space(tmp_path, "pretrain", searcher={"type": "random", "seed": 0},
                        scheduler={"type": "none"},
                        budget={"num_samples": 2, "max_concurrent_trials": 1},
                        parameters={"s": {"type": "categorical", "choices": [32.0, 1.0e39], "default": 32.0}})
    outcomes = run_search(SearchOptions(stage="pretrain", storage=str(tmp_path / "exp"), budget="smoke",
                                        space=space, num_samples=2, max_failures=0, quiet=True))
    rows = outcomes[0].rows
    errored = [r for r in rows if r.status.startswith("ERROR")]
    # Trial 1 runs the default (32); the seeded random sampler gives trial 2 the overflowing s.
    assert [r.params["s"] for r in rows] == [32.0, 1.0e39] and len(errored) == 1
    assert any("NonFiniteLossError" in r.status or "loss is" in r.status for r in errored), errored
    assert outcomes[0].manifest is not None and outcomes[0].manifest.config["s"] == 32.0


def test_stage_whose_every_trial_fails_writes_no_manifest(ray_cluster, tmp_path):
    space = write_space(tmp_path, "pretrain", scheduler={"type": "none"},
                        parameters={"s": {"type": "categorical", "choices": [1.0e39, 2.0e39], "default": 1.0e39}})
    storage = tmp_path / "exp"
    outcomes = run_search(SearchOptions(stage="pretrain", storage=str(storage), budget="smoke",
                                        space=space, max_failures=0, quiet=True))
    assert outcomes[0].manifest is None and "every trial of stage pretrain failed" in outcomes[0].error
    assert not (storage / "default" / "pretrain" / "best.json").exists()


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "ray-train"])
def test_resume_after_the_driver_is_killed(ray_cluster, tmp_path, workers):
    # 16 ids x 20 images in batches of 8: 40 steps an epoch, slow enough to be killed mid-run.
    # In process, a second trial shows the resumed search goes on; a Ray Train trial costs ~30 s
    # of start-up on 2 cores, and the ASHA test runs several in one search: one here.
    n_trials = 2 if workers == 1 else 1
    space = write_space(tmp_path, "pretrain", scheduler={"type": "none"},
                        budget={"num_samples": n_trials, "max_concurrent_trials": 1},
                        resources={"workers": workers, "cpus_per_worker": 1, "gpus_per_worker": 0},
                        fixed={"arch": "mobilefacenet_s", "max_epoch": 3, "label_batch_size": 8},
                        parameters={"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True,
                                           "default": 0.05}})
    storage = tmp_path / "exp"
    cmd = [sys.executable, os.path.join(REPO, "tune", "run_search.py"), "--stage", "pretrain",
           "--space", space, "--storage", str(storage), "--address", ray_cluster,
           "--synthetic", "n_labeled_ids=16", "--synthetic", "images_per_labeled_id=20",
           "--synthetic", "n_unlabeled_ids=40", "--synthetic", "n_val_ids=16", "--synthetic", "val_pairs=100"]
    driver, first_trial = start_search_until_a_trial_reports_epoch_2(cmd)
    deadline = time.time() + 300
    # Kill once that trial's epoch-2 checkpoint is persisted (by Tune, or by Ray Train for a
    # multi-worker trial) and Tune has snapshotted its state since.
    search_dir = storage / "default" / "search_pretrain"
    checkpoint = (search_dir / f"pretrain_{first_trial}" / "checkpoint_000001" if workers == 1 else
                  storage / "default" / f"train_pretrain_{first_trial}" / "checkpoint_epoch=002")

    def snapshotted():
        return checkpoint.exists() and any(p.stat().st_mtime > checkpoint.stat().st_mtime
                                           for p in search_dir.glob("experiment_state-*.json"))

    while not snapshotted():
        assert time.time() < deadline, "the epoch-2 checkpoint never reached Tune's snapshot"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (storage / "default" / "pretrain" / "best.json").exists()

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    manifest = read_manifest(storage / "default" / "pretrain" / "best.json")
    assert manifest.config["max_epoch"] == 3
    epochs = {}
    for path in glob.glob(str(storage / "default" / "search_pretrain" / "*" / "result.json")):
        with open(path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
        epochs[rows[0]["trial_id"]] = [r["epoch"] for r in rows]
    assert len(epochs) == n_trials and all(max(e) == 3 for e in epochs.values()), epochs
    # The first trial was finished or continued from its checkpoint: it never started over.
    assert epochs[first_trial].count(1) == 1, epochs


def test_a_trial_the_cluster_cannot_hold_is_an_error_before_it_starts(ray_cluster, tmp_path):
    from virface.search.runner import SearchError

    with pytest.raises(SearchError, match=r"needs 3 worker\(s\).*the Ray cluster has"):
        run_search(SearchOptions(stage="pretrain", storage=str(tmp_path / "exp"), budget="smoke",
                                 workers=3, quiet=True))


def test_missing_data_is_an_error_before_any_trial(ray_cluster, tmp_path):
    from virface.search.runner import SearchError

    with pytest.raises(SearchError, match="labeled: /nonexistent/faces does not exist"):
        run_search(SearchOptions(stage="pretrain", storage=str(tmp_path / "exp"), budget="smoke",
                                 data={"labeled": "/nonexistent/faces"}, quiet=True))
    assert not (tmp_path / "exp" / "default" / "search_pretrain").exists()


def test_multi_worker_trials_run_on_ray_train_and_asha_stops_them_cleanly(ray_cluster, tmp_path):
    # 3 trials of 2 DDP ranks each on Ray Train, one after another on 2 CPUs (the second waits
    # for the first's CPUs). Selected on the training loss, which a larger ArcFace margin m
    # raises from the first step on: the first trial takes the smallest m, every later one a
    # larger, so ASHA stops the second after its first epoch (its loss above the rung's
    # median), whatever the sampler draws. (On 100 validation pairs after 2 steps, every trial
    # scored 0.5: ties, which ASHA never stops.) The stopped trial's worker group is taken
    # down, not left holding the CPUs the third trial's group needs.
    space = write_space(tmp_path, "pretrain", scheduler={"type": "asha", "grace_period": 1},
                        metric={"name": "loss", "mode": "min"},
                        budget={"num_samples": 3, "max_concurrent_trials": 2},
                        resources={"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0},
                        fixed={"arch": "mobilefacenet_s", "max_epoch": 2, "steps_per_epoch": 2, "lr": 0.1},
                        parameters={"m": {"type": "float", "low": 0.1, "high": 0.9, "default": 0.1}})
    storage = tmp_path / "exp"
    outcomes = run_search(SearchOptions(stage="pretrain", storage=str(storage), space=space,
                                        quiet=True, data={"synthetic": dict(n_labeled_ids=16, images_per_labeled_id=6,
                                                                            n_unlabeled_ids=40, n_val_ids=16,
                                                                            val_pairs=100)}))
    rows = outcomes[0].rows
    assert len(rows) == 3 and all(r.outcome in ("completed", "stopped early") for r in rows), rows
    first, second, third = rows
    assert first.params["m"] == 0.1 and first.outcome == "completed"
    assert second.params["m"] > 0.1 and second.outcome == "stopped early", rows
    # After the stop, the third trial's group got the CPUs and trained.
    assert third.outcome in ("completed", "stopped early") and third.epochs >= 1, rows
    manifest = outcomes[0].manifest
    assert manifest is not None
    # Each trial's checkpoints are its Ray Train run's; the manifest names the best one's.
    runs = sorted(p.name for p in (storage / "default").glob("train_pretrain_*"))
    assert runs == sorted(f"train_pretrain_{r.trial_id}" for r in rows)
    assert manifest.checkpoint.startswith(str(storage / "default" / f"train_pretrain_{manifest.trial_id}"))
    state = load_checkpoint(manifest.checkpoint)
    assert state["best"]["value"] == pytest.approx(manifest.metric_value)


def test_a_multi_objective_pretrain_search_ends_with_its_pareto_front(ray_cluster, tmp_path):
    from virface.search.pareto import Objective, dominates

    storage = tmp_path / "exp"
    [outcome] = run_search(SearchOptions(stage="pretrain", storage=str(storage), budget="smoke", quiet=True,
                                         num_samples=3, space=os.path.join(REPO, "search_spaces",
                                                                           "pretrain_pareto.yaml")))
    assert outcome.manifest is not None, outcome.error
    m = read_manifest(storage / "default" / "pretrain" / "best.json")
    pareto = m.pareto
    assert pareto["objectives"] == [["synth_cfp_fp_acc", "max"], ["latency_ms", "min"]]
    # Every trial measured its own model; the seed's three start-up trials cover the three backbones.
    assert {t["params"]["arch"] for t in pareto["trials"]} == {"mobilefacenet_s", "mobilefacenet", "resnet18"}
    assert all(t["values"]["latency_ms"] > 0 for t in pareto["trials"])
    objectives = [Objective(*o) for o in pareto["objectives"]]
    front_ids = {p["trial_id"] for p in pareto["front"]}
    for t in pareto["trials"]:       # on the front exactly when no trial dominates it
        beaten = any(dominates(o["values"], t["values"], objectives) for o in pareto["trials"])
        assert (t["trial_id"] in front_ids) == (not beaten)
    # The select rule: the most accurate front trial under 10 ms feeds the next stage.
    fitting = [p for p in pareto["front"] if p["values"]["latency_ms"] <= 10]
    if fitting:
        assert m.metric_value == max(p["values"]["synth_cfp_fp_acc"] for p in fitting)
        assert m.trial_id in {p["trial_id"] for p in fitting}
        assert load_checkpoint(m.checkpoint)["config"]["arch"] == \
            next(p for p in fitting if p["trial_id"] == m.trial_id)["params"]["arch"]
    assert os.path.getsize(pareto["plot"]) > 1000
    assert "Pareto front on synth_cfp_fp_acc (max), latency_ms (min)" in outcome.table()


def test_carry_top_two_passes_both_pretrain_trials_on_and_records_the_lineage(ray_cluster, tmp_path):
    storage = tmp_path / "exp"
    outcomes = run_search(SearchOptions(stage="baseline", storage=str(storage), budget="smoke", quiet=True,
                                        num_samples=3, carry_top=2))
    assert all(o.manifest is not None for o in outcomes), [o.error for o in outcomes]
    pre, base = (read_manifest(storage / "default" / s / "best.json") for s in ("pretrain", "baseline"))
    assert len(pre.carried) == 2 and pre.carried[0]["trial_id"] == pre.trial_id
    assert pre.carried[0]["metric_value"] >= pre.carried[1]["metric_value"]
    choices = {c["trial_id"]: c["checkpoint"] for c in pre.carried}
    # Every baseline trial chose one of the two; the sampler tried both.
    assert set(base.trial_upstreams.values()) == set(choices)
    rows = {r.trial_id: r for r in outcomes[-1].rows}
    assert all(r.params["upstream"] in choices for r in rows.values())
    chosen_upstream = base.trial_upstreams[base.trial_id]
    assert base.upstream == choices[chosen_upstream]
    assert load_checkpoint(base.checkpoint)["config"]["pretrained_file"] == choices[chosen_upstream]
    assert base.lineage == [f"pretrain:{chosen_upstream}", f"baseline:{base.trial_id}"]
    assert all(c["lineage"][0] == f"pretrain:{c['upstream']}" for c in base.carried)
    assert "upstream=" in outcomes[-1].table() and "lineage: pretrain:" in outcomes[-1].table()
    # TensorBoard's HParams of each trial name its upstream.
    run = [r for r in glob.glob(str(storage / "default" / "baseline" / "tb" / "*")) if os.path.isdir(r)][0]
    _, hparams = tb_scalars_and_hparams(run)
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["upstream"].string_value in choices
