"""The search as a user runs it: on data in other tools' formats (an insightface .rec, a meta
list, .bin pair sets named lfw and cfp_fp), and as the installed ``virface-search`` outside the
checkout."""
import glob
import os
import shutil
import subprocess
import sys
import time

import pytest

from virface.search.manifest import read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

TINY = dict(image_size=32, n_labeled_ids=10, images_per_labeled_id=6, n_unlabeled_ids=30,
            unlabeled_images_per_id=(1, 3), n_val_ids=20, val_pairs=40)


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """Data written by the project's writers in the real formats, under other pair-set names."""
    from virface.data.synthetic import SyntheticSpec, build_synthetic, export_synthetic

    out = tmp_path_factory.mktemp("user-data")
    paths = export_synthetic(build_synthetic(SyntheticSpec(**TINY)), str(out / "export"))
    os.rename(paths["synth_lfw"], out / "lfw.bin")
    os.rename(paths["synth_cfp_fp"], out / "cfp_fp.bin")
    os.rename(paths["synth_cfp_ff"], out / "agedb.bin")
    return {"rec": os.path.join(paths["labeled_rec"], "train.rec"), "meta": paths["unlabeled_meta"],
            "lfw": str(out / "lfw.bin"), "cfp_fp": str(out / "cfp_fp.bin"), "agedb": str(out / "agedb.bin")}


def search(args, cwd, env=None, timeout=600):
    return subprocess.run(args, cwd=cwd, env=env or os.environ.copy(), capture_output=True, text=True,
                          timeout=timeout)


def test_the_smoke_search_runs_every_stage_on_a_rec_a_meta_list_and_bin_pair_sets(user_data, tmp_path, shared_ray):
    common = ["--budget", "smoke", "--storage", str(tmp_path / "exp"), "--name", "hold",
              "--labeled", user_data["rec"], "--unlabeled", user_data["meta"],
              "--val", f"lfw={user_data['lfw']}", "--val", f"cfp_fp={user_data['cfp_fp']}",
              "--test", f"agedb={user_data['agedb']}", "--input_size", "32"]
    script = os.path.join(REPO, "tune", "run_search.py")
    for stage in ("virface", "virclass"):
        done = search([sys.executable, script, "--stage", stage, *common], cwd=str(tmp_path))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifests = {s: read_manifest(tmp_path / "exp" / "hold" / s / "best.json")
                 for s in ("pretrain", "generator", "virface", "virclass")}
    # The metric followed the data: the harder of the two --val sets (the --test set, which
    # agedb's name would rank harder still, is reported only).
    assert manifests["virclass"].metric_name == "cfp_fp_acc" == manifests["virface"].metric_name
    assert 0.0 <= manifests["virclass"].test_metrics["test_agedb_acc"] <= 1.0
    assert manifests["generator"].metric_name == "vi_identity_keep"      # generator.yaml names it
    assert manifests["virclass"].upstream == manifests["pretrain"].checkpoint
    assert manifests["virclass"].config["labeled"] == user_data["rec"]

    # Once finished, the same command prints the results again without Ray or training.
    start = time.time()
    again = search([sys.executable, script, "--stage", "virclass", *common], cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished earlier" in again.stdout and "Ray" not in again.stdout
    assert "== stage virclass (finished earlier; reused)" in again.stdout
    assert "test (reported, not selected on; ± SE over pairs): test_agedb_acc=" in again.stdout
    assert time.time() - start < 30


def test_a_metric_the_data_cannot_produce_fails_before_ray_starts(user_data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("metric: {name: synth_cfp_fp_acc, mode: max}\nfixed: {arch: mobilefacenet_s}\n")
    done = search([sys.executable, os.path.join(REPO, "tune", "run_search.py"), "--stage", "pretrain",
                   "--space", str(space), "--budget", "smoke", "--storage", str(tmp_path / "exp"),
                   "--labeled", user_data["rec"], "--val", f"lfw={user_data['lfw']}"], cwd=str(tmp_path))
    assert done.returncode == 2
    assert f"{space}:1: metric.name: 'synth_cfp_fp_acc'" in done.stderr
    assert "'lfw_acc'" in done.stderr and "starting a local Ray" not in done.stdout
    assert not (tmp_path / "exp").exists()


def test_the_installed_wheel_searches_from_outside_the_checkout(tmp_path):
    # Build the wheel from a copy of the files git would commit, as a release would.
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if os.path.exists(os.path.join(REPO, name)):
            os.makedirs(source / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), source / name)
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = glob.glob(str(wheels / "virface-*.whl"))
    # --target, not --prefix: pip would uninstall this environment's own (editable) virface first.
    site = str(tmp_path / "site")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                                site, wheel], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # Every space the checkout ships, each stage's default among them.
    shipped = sorted(f for f in os.listdir(os.path.join(REPO, "search_spaces")) if f.endswith(".yaml"))
    assert {"baseline.yaml", "generator.yaml", "pretrain.yaml", "virclass.yaml", "virface.yaml"} <= set(shipped)
    assert sorted(os.listdir(os.path.join(site, "virface", "search", "default_spaces"))) == shipped

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": site}
    where = search([sys.executable, "-c", "import virface; print(virface.__file__)"], cwd=str(elsewhere), env=env)
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr
    # Shipped spaces by name, found in the installed package.
    listed = search([os.path.join(site, "bin", "virface-search"), "--spaces"], cwd=str(elsewhere), env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert os.path.join(site, "virface", "search", "default_spaces", "pretrain_pareto.yaml") in listed.stdout
    done = search([os.path.join(site, "bin", "virface-search"), "--budget", "smoke"], cwd=str(elsewhere), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert os.path.join(site, "virface", "search", "default_spaces", "virface.yaml") in done.stdout
    for stage in ("pretrain", "generator", "virface"):
        assert read_manifest(elsewhere / "experiments" / "default" / stage / "best.json").stage == stage
    # The environment's own install is untouched.
    mine = search([sys.executable, "-c", "import virface; print(virface.__file__)"], cwd=str(elsewhere))
    assert mine.stdout.strip() == os.path.join(REPO, "virface", "__init__.py"), mine.stdout + mine.stderr
