"""virface-train: argument types, the chained CLI, the real data formats, and bad data."""
import json
import os

import numpy as np
import torch
import pytest

from virface.train import build_parser, config_from_args, main

TINY_SYNTHETIC = ["--synthetic", "n_labeled_ids=8", "--synthetic", "images_per_labeled_id=4",
                  "--synthetic", "n_unlabeled_ids=12", "--synthetic", "n_val_ids=8",
                  "--synthetic", "val_pairs=40", "--synthetic", "image_size=16"]
FAST = ["--arch", "mobilefacenet_s", "--feat_len", "16", "--label_batch_size", "8",
        "--unlabel_batch_size", "4", "--steps_per_epoch", "2", "--max_epoch", "1", "--gen_num", "2",
        "--device", "cpu", "--no-tensorboard"]


def parse(*argv):
    return config_from_args(build_parser().parse_args(["--method", "pretrain", *argv]))


def test_flags_have_real_types():
    config = parse("--decay_steps", "4", "6", "8", "--no-eval", "--KL", "0.5", "--L2", "100")
    assert config.decay_steps == (4, 6, 8) and config.eval is False
    assert config.KL == 0.5 and config.L2 == 100.0
    assert parse().eval is True and parse("--eval").eval is True


def test_eval_false_is_an_error_not_true(capsys):
    # The reference's type=bool turned "--eval False" into True.
    with pytest.raises(SystemExit):
        parse("--eval", "False")


def test_pretrain_file_is_an_alias_of_pretrained_file():
    assert parse("--pretrain_file", "x.pt").pretrained_file == parse("--pretrained_file", "x.pt").pretrained_file


def test_val_and_synthetic_options_are_parsed():
    config = parse("--val", "lfw=/data/lfw.bin", "--val", "cfp_fp=/data/cfp", "--synthetic", "n_labeled_ids=10")
    assert config.val == {"lfw": "/data/lfw.bin", "cfp_fp": "/data/cfp"}
    assert config.synthetic == {"n_labeled_ids": 10}


def test_chain_on_synthetic_faces(tmp_path):
    run = str(tmp_path / "runs")
    assert main(["--method", "pretrain", "--snapshot_prefix", f"{run}/pre", *FAST, *TINY_SYNTHETIC]) == 0
    assert main(["--method", "generator", "--pretrained_file", f"{run}/pre/best.pt",
                 "--snapshot_prefix", f"{run}/gen", *FAST[4:]]) == 0
    assert main(["--method", "virface", "--pretrain_file", f"{run}/gen/best.pt",
                 "--snapshot_prefix", f"{run}/vf", *FAST[4:]]) == 0
    lines = open(f"{run}/vf/metrics.jsonl").read().splitlines()
    metrics = json.loads(lines[-1])
    for name in ("synth_lfw", "synth_cfp_ff", "synth_cfp_fp"):
        assert 0.0 <= metrics[f"{name}_acc"] <= 1.0
    assert not os.path.exists("model_best.pytorch")              # nothing lands in the cwd


def test_chain_from_exported_rec_and_bin(tmp_path):
    from virface.data.synthetic import SyntheticSpec, build_synthetic, export_synthetic

    faces = build_synthetic(SyntheticSpec(image_size=16, n_labeled_ids=8, images_per_labeled_id=4,
                                          n_unlabeled_ids=12, n_val_ids=8, val_pairs=40))
    paths = export_synthetic(faces, str(tmp_path / "data"))
    data = tmp_path / "data"
    real = ["--labeled", str(data / "labeled_rec"), "--unlabeled", str(data / "unlabeled_folder" / "meta.txt"),
            "--val", f"cfp_fp={data / 'val' / 'synth_cfp_fp.bin'}", "--input-size", "16"]
    run = str(tmp_path / "runs")
    assert main(["--method", "pretrain", "--snapshot_prefix", f"{run}/pre", *FAST, *real]) == 0
    assert main(["--method", "generator", "--pretrained_file", f"{run}/pre/best.pt",
                 "--snapshot_prefix", f"{run}/gen", *FAST[4:], *real]) == 0
    assert main(["--method", "virface", "--pretrained_file", f"{run}/gen/best.pt",
                 "--snapshot_prefix", f"{run}/vf", *FAST[4:], *real]) == 0
    metrics = json.loads(open(f"{run}/vf/metrics.jsonl").read().splitlines()[-1])
    assert "cfp_fp_acc" in metrics and "synth_cfp_fp_acc" not in metrics
    assert paths


def make_folder_with_a_corrupt_image(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for ident in ("a", "b"):
        os.makedirs(root / ident)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / ident / f"{k}.png")
    (root / "a" / "1.png").write_bytes(b"this is not a png")


def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    make_folder_with_a_corrupt_image(tmp_path / "faces")
    args = ["--method", "pretrain", "--snapshot_prefix", str(tmp_path / "run"), *FAST, "--no-eval",
            "--labeled", str(tmp_path / "faces"), "--input-size", "16", "--label_batch_size", "6",
            "--loader-workers", "0"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # One epoch = one batch of all 6 images: the corrupt one is met once and replaced.
    assert metrics["steps"] == 1 and metrics["skipped_images"] == 1


def test_strict_data_raises_on_the_corrupt_image(tmp_path, capsys):
    make_folder_with_a_corrupt_image(tmp_path / "faces")
    args = ["--method", "pretrain", "--snapshot_prefix", str(tmp_path / "run"), *FAST, "--no-eval",
            "--labeled", str(tmp_path / "faces"), "--input-size", "16", "--label_batch_size", "6",
            "--loader-workers", "0", "--strict-data"]
    assert main(args) == 2
    assert os.path.join("a", "1.png") in capsys.readouterr().err


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["--method", "virface", "--snapshot_prefix", str(tmp_path / "vf"), *FAST]) == 2
    assert "needs a checkpoint with backbone + head + generator" in capsys.readouterr().err


def test_unknown_synthetic_key_is_named(tmp_path, capsys):
    assert main(["--method", "pretrain", "--snapshot_prefix", str(tmp_path / "r"), *FAST,
                 "--synthetic", "n_identities=5"]) == 2
    assert "synthetic: unknown key(s) ['n_identities']" in capsys.readouterr().err


def test_a_full_disk_is_a_named_error_and_leaves_no_half_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    run = tmp_path / "run"
    assert main(["--method", "pretrain", "--snapshot_prefix", str(run), *FAST, *TINY_SYNTHETIC]) == 2
    err = capsys.readouterr().err
    assert "epoch_001.pt: cannot write (No space left on device)" in err
    assert os.listdir(run / "checkpoints") == []


@pytest.mark.parametrize("argv,message", [
    (["--workers", "0"], "workers: 0 must be >= 1"),
    (["--workers", "2", "--cpus_per_worker", "0"], "cpus_per_worker: 0.0 must be > 0"),
    (["--gpus_per_worker", "1"], "give --workers N (N >= 2) with them"),
    (["--address", "127.0.0.1:6379"], "give --workers N (N >= 2) with them"),
])
def test_ray_train_options_are_checked_before_anything_starts(argv, message, capsys, tmp_path):
    assert main(["--method", "pretrain", "--snapshot_prefix", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_worker_group_the_cluster_cannot_hold_is_named_with_both_sides():
    from virface.errors import ConfigError
    from virface.ray_train import check_workers_fit

    check_workers_fit(2, 1.0, 0.0, {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"4 worker\(s\) x \(1.0 CPU, 1.0 GPU\).*the Ray cluster has "
                                          r"\{'CPU': 8.0, 'GPU': 2.0\}"):
        check_workers_fit(4, 1.0, 1.0, {"CPU": 8.0, "GPU": 2.0})


def test_ray_trains_v1_api_is_an_error_naming_the_variable(monkeypatch):
    from virface.errors import ConfigError
    from virface.ray_train import check_train_v2

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    with pytest.raises(ConfigError, match="RAY_TRAIN_V2_ENABLED='0' turns Ray Train's V2 API off"):
        check_train_v2()


def test_a_user_architecture_module_is_shipped_to_the_ray_workers_and_installed_ones_are_not(tmp_path, monkeypatch):
    from virface.ray_train import user_code_runtime_env
    from virface.search.runner import user_archs
    from virface.search.space import load_search_space

    (tmp_path / "my_nets").mkdir()
    (tmp_path / "my_nets" / "__init__.py").write_text("")
    (tmp_path / "my_nets" / "small.py").write_text("def build(feat_len):\n    return None\n")
    (tmp_path / "flat_net.py").write_text("def build(feat_len):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = user_code_runtime_env(["my_nets.small:build", "flat_net:build", "my_nets.small:build",
                                 "mobilefacenet_s", "torchvision.models:resnet18", "virface.backbones:build_backbone",
                                 None])
    # One entry per top-level module (the package, not its submodule; once), none for a built-in
    # name, a module installed in site-packages or virface itself.
    shipped = [getattr(m, "__file__", None) for m in env["py_modules"]]
    assert shipped == [str(tmp_path / "my_nets" / "__init__.py"), str(tmp_path / "flat_net.py")]
    assert user_code_runtime_env(["iresnet50", "torchvision.models:resnet18"]) is None

    # A search ships what its stages may build: a fixed arch and every searched choice.
    space = tmp_path / "pretrain.yaml"
    space.write_text("fixed: {arch: flat_net:build}\n")
    archs = user_archs({"pretrain": load_search_space(str(space), "pretrain")}, None)
    assert archs == ["flat_net:build"]
    space.write_text("parameters:\n  arch: {type: categorical, choices: ['my_nets.small:build', mobilefacenet_s], "
                     "default: mobilefacenet_s}\n")
    archs = user_archs({"pretrain": load_search_space(str(space), "pretrain")}, None)
    assert archs == ["my_nets.small:build", "mobilefacenet_s"]


def test_a_search_from_a_checkpoint_of_a_user_architecture_ships_its_module(tmp_path, monkeypatch):
    # The stage inherits the upstream checkpoint's backbone: its module goes with the job, though
    # no search space names it.
    import virface.search.runner as runner
    from virface.config import TrainConfig
    from virface.ray_train import run_archs, user_code_runtime_env
    from virface.search.runner import SearchOptions, run_search
    from virface.stages import run_stage

    (tmp_path / "upstream_net.py").write_text(
        "import torch.nn as nn\n\n\ndef build(feat_len, input_size):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * input_size * input_size, feat_len))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    synthetic = dict(image_size=16, n_labeled_ids=6, images_per_labeled_id=3, n_unlabeled_ids=8,
                     n_val_ids=20, val_pairs=40)
    upstream = run_stage(TrainConfig(method="pretrain", arch="upstream_net:build", feat_len=16, input_size=16,
                                     label_batch_size=6, steps_per_epoch=1, max_epoch=1, tensorboard=False,
                                     device="cpu", synthetic=synthetic),
                         str(tmp_path / "pre")).best_checkpoint
    asked = []

    class RayNotStarted(Exception):
        pass

    def init_ray(options, say, archs=()):
        asked.append(list(archs))
        raise RayNotStarted
    monkeypatch.setattr(runner, "init_ray", init_ray)
    with pytest.raises(RayNotStarted):
        run_search(SearchOptions(stage="virclass", storage=str(tmp_path / "exp"), from_checkpoint=upstream,
                                 data={"synthetic": synthetic}, quiet=True))
    [archs] = asked
    assert "upstream_net:build" in archs
    assert [m.__name__ for m in user_code_runtime_env(archs)["py_modules"]] == ["upstream_net"]
    # So does `virface-train --workers N --pretrained_file` of a later stage.
    later = TrainConfig(method="virclass", pretrained_file=upstream, synthetic=synthetic)
    assert "upstream_net:build" in run_archs(later)
