"""Mistakes a search can know about before it starts Ray are errors before it starts Ray: every
stage's space in the chain, the budget, each arch choice, the data against the upstream."""
import os

import pytest
import yaml

import virface.search.runner as runner
from virface.config import TrainConfig
from virface.errors import ConfigError, VirFaceError
from virface.search.runner import SearchOptions, run_search
from virface.search.space import default_space_path


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the error was found")
    monkeypatch.setattr(runner, "init_ray", refuse)


def space_file(tmp_path, stage, **changes):
    space = yaml.safe_load(default_space_path(stage).read_text())
    space.update(changes)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return str(path)


def test_a_budget_that_would_never_end_or_never_start_is_refused():
    for samples in (-1, 0):
        with pytest.raises(ConfigError, match=f"num_samples: {samples} must be >= 1"):
            SearchOptions(stage="pretrain", num_samples=samples)


def test_a_broken_downstream_space_fails_before_its_upstream_stages_are_searched(tmp_path):
    params = yaml.safe_load(default_space_path("virface").read_text())["parameters"]
    params["g_lr"]["when"] = {"optim_moode": "alternate"}
    space = space_file(tmp_path, "virface", parameters=params)
    with pytest.raises(ConfigError, match=r"virface.yaml:\d+: parameters.g_lr.when.optim_moode: refers to"):
        run_search(SearchOptions(stage="virface", storage=str(tmp_path / "exp"), space=space, quiet=True))
    assert not (tmp_path / "exp").exists()


def test_an_unknown_arch_choice_and_a_number_where_a_list_belongs_are_named(tmp_path):
    arch = space_file(tmp_path, "pretrain", fixed={"max_epoch": 2},
                      parameters={"arch": {"type": "categorical", "choices": ["mobilefacenet_s", "resnet51"],
                                                "default": "mobilefacenet_s"}})
    with pytest.raises(ConfigError, match=r"pretrain.yaml:\d+: parameters.arch.choices\[1\]: 'resnet51' is not a "
                                          r"valid arch: arch: unknown backbone 'resnet51' \(did you mean"):
        run_search(SearchOptions(stage="pretrain", storage=str(tmp_path / "exp"), space=arch, quiet=True))
    steps = space_file(tmp_path, "pretrain", fixed={"arch": "mobilefacenet_s", "decay_steps": 8})
    with pytest.raises(ConfigError, match=r"decay_steps: 8 must be a list of integers \(e.g. \[8, 12\]\)"):
        run_search(SearchOptions(stage="pretrain", storage=str(tmp_path / "exp"), space=steps, quiet=True))
    with pytest.raises(ConfigError, match="decay_steps: 8 must be a list of integers"):
        TrainConfig(decay_steps=8)


def test_data_with_another_identity_count_than_the_upstream_checkpoint_is_refused(tmp_path, tiny_data):
    from virface.stages import run_stage

    synthetic = dict(image_size=16, n_labeled_ids=6, images_per_labeled_id=3, n_unlabeled_ids=8,
                     n_val_ids=20, val_pairs=40)
    upstream = run_stage(TrainConfig(method="pretrain", arch="mobilefacenet_s", feat_len=16, label_batch_size=6,
                                     steps_per_epoch=1, max_epoch=1, tensorboard=False, device="cpu",
                                     synthetic=synthetic),
                         str(tmp_path / "pre")).best_checkpoint
    other = {**synthetic, "n_labeled_ids": 9}
    with pytest.raises(VirFaceError, match="trained on 6 labeled identities, but the labeled data given has 9"):
        run_search(SearchOptions(stage="virclass", storage=str(tmp_path / "exp"), from_checkpoint=upstream,
                                 data={"synthetic": other}, quiet=True))


def test_a_storage_that_is_a_file_is_named_before_ray_starts(tmp_path, capsys):
    from virface.search.cli import main

    (tmp_path / "storage").write_text("not a folder")
    assert main(["--stage", "pretrain", "--budget", "smoke", "--storage", str(tmp_path / "storage")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'storage' / 'default'}: cannot create the experiment folder or write into it " \
           f"(Not a directory" in err and "--storage must be a folder this process can write" in err
    assert (tmp_path / "storage").read_text() == "not a folder"


def test_a_storage_on_a_read_only_place_is_named_before_ray_starts(tmp_path, monkeypatch, capsys):
    import errno

    from virface.search.cli import main

    # Simulated: this test may run as root, whom permission bits do not stop; the file system
    # answers every create under the storage with EROFS, as a read-only mount does.
    storage = tmp_path / "ro"
    storage.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def read_only(call):
        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(storage)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return call(path, *args, **kwargs)
        return refuse
    monkeypatch.setattr(os, "open", read_only(real_open))
    monkeypatch.setattr(os, "mkdir", read_only(real_mkdir))
    assert main(["--stage", "pretrain", "--budget", "smoke", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert f"{storage / 'default'}: cannot create the experiment folder or write into it " \
           f"(Read-only file system: {storage / 'default'}" in err
    assert os.listdir(storage) == []
