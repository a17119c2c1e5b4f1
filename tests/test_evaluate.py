"""virface-eval: a checkpoint scores what its training run logged; two checkpoints give their
paired difference on the same pairs; bad input is named."""
import json
import os

import pytest
import torch
from scipy import stats as scipy_stats

from virface.checkpoint import load_checkpoint, save_checkpoint
from virface.evaluate import main as eval_main
from virface.train import main as train_main

TINY_SYNTHETIC = ["--synthetic", "n_labeled_ids=8", "--synthetic", "images_per_labeled_id=4",
                  "--synthetic", "n_unlabeled_ids=12", "--synthetic", "n_val_ids=8",
                  "--synthetic", "val_pairs=40", "--synthetic", "image_size=16"]
FAST = ["--arch", "mobilefacenet_s", "--feat_len", "16", "--label_batch_size", "8",
        "--steps_per_epoch", "2", "--max_epoch", "1", "--device", "cpu", "--no-tensorboard"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two 1-epoch pretrain runs on the tiny built-in faces (seeds 0 and 1): their best.pt and
    the metrics line of the epoch each best.pt holds."""
    root = tmp_path_factory.mktemp("eval_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIRFACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "virface-cache"))
        runs = []
        for seed in (0, 1):
            folder = root / f"seed{seed}"
            assert train_main(["--method", "pretrain", "--snapshot_prefix", str(folder), "--seed", str(seed),
                               *FAST, *TINY_SYNTHETIC]) == 0
            logged = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
            runs.append((str(folder / "best.pt"), logged))
    return runs


def scored(tmp_path, *argv):
    out = tmp_path / f"eval{len(os.listdir(tmp_path))}.json"
    assert eval_main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_checkpoint_scores_the_accuracy_its_training_run_logged(two_runs, tmp_path, capsys):
    best, logged = two_runs[0]
    result = scored(tmp_path, best)
    err = capsys.readouterr().err
    assert "no --val or --test given: scoring the built-in synthetic faces' pair sets" in err
    assert "pairs/s" in err
    # The three validation and three test sets training reported, under the same names.
    assert sorted(result["pair_sets"]) == sorted(k[:-4] for k in logged if k.endswith("_acc")
                                                 and not k.startswith("best_"))
    for key, entry in result["pair_sets"].items():
        model = entry["models"][0]
        for metric in ("acc", "acc_se", "acc_std", "tar_far1e-3"):
            assert model[metric] == pytest.approx(logged[f"{key}_{metric}"], abs=1e-12), (key, metric)
        assert entry["n_pairs"] == 40 and entry["role"] == ("test" if key.startswith("test_") else "val")
        # SE over 40 pairs: sqrt(acc (1 - acc) / 40), worked out from the logged accuracy.
        acc = logged[f"{key}_acc"]
        assert model["acc_se"] == pytest.approx((acc * (1 - acc) / 40) ** 0.5)


def test_two_checkpoints_give_their_paired_difference_with_an_exact_mcnemar_p(two_runs, tmp_path, capsys):
    (a, logged_a), (b, logged_b) = two_runs
    result = scored(tmp_path, a, b)
    out = capsys.readouterr().out
    assert "exact McNemar" in out and "A - B" in out and result["difference"].startswith("A - B")
    for key, entry in result["pair_sets"].items():
        d = entry["difference"]
        # Equal folds of 4 pairs: the accuracy is the share of pairs right, so A - B is the
        # difference of the logged accuracies, and the discordant counts carry it.
        assert d["diff"] == pytest.approx(100 * (logged_a[f"{key}_acc"] - logged_b[f"{key}_acc"]))
        assert d["n_a_only"] - d["n_b_only"] == round(40 * (logged_a[f"{key}_acc"] - logged_b[f"{key}_acc"]))
        discordant = d["n_a_only"] + d["n_b_only"]
        expected_p = scipy_stats.binomtest(d["n_a_only"], discordant, 0.5).pvalue if discordant else 1.0
        assert d["p_value"] == pytest.approx(expected_p)
        assert d["ci95"][0] < d["diff"] < d["ci95"][1] or d["se"] == 0
    assert any(e["difference"]["n_a_only"] + e["difference"]["n_b_only"] for e in result["pair_sets"].values())


def test_given_pair_sets_replace_the_built_in_ones(two_runs, tmp_path):
    from virface.data.synthetic import SyntheticSpec, build_synthetic
    from virface.evaluation.verification import write_bin

    best, logged = two_runs[0]
    faces = build_synthetic(SyntheticSpec(image_size=16, n_labeled_ids=8, images_per_labeled_id=4,
                                          n_unlabeled_ids=12, n_val_ids=8, val_pairs=40))
    path = write_bin(faces.pair_sets["synth_cfp_fp"], str(tmp_path / "cfp_fp.bin"))
    result = scored(tmp_path, best, "--test", f"fp={path}")
    assert list(result["pair_sets"]) == ["test_fp"]
    # The same pairs as the built-in synth_cfp_fp: the same accuracy training logged for it.
    assert result["pair_sets"]["test_fp"]["models"][0]["acc"] == pytest.approx(logged["synth_cfp_fp_acc"])


def test_bad_input_is_named(two_runs, tmp_path, capsys):
    best, _ = two_runs[0]
    missing = str(tmp_path / "nowhere.pt")
    assert eval_main([best, missing]) == 2
    assert f"checkpoint not found: {missing}" in capsys.readouterr().err

    # The same checkpoint with a wider embedding: another backbone.
    from virface.backbones import build_backbone

    state = load_checkpoint(best)
    state["model"] = {**state["model"], "feat_len": 32}
    state["backbone"] = build_backbone("mobilefacenet_s", feat_len=32, input_size=16).state_dict()
    wide = save_checkpoint(state, str(tmp_path / "wide.pt"))
    assert eval_main([best, wide, "--device", "cpu"]) == 2
    assert f"{wide} is another backbone than {best}: feat_len 32 vs 16" in capsys.readouterr().err

    junk = tmp_path / "lfw.bin"
    junk.write_text("not a pickle")
    assert eval_main([best, "--val", f"lfw={junk}", "--device", "cpu"]) == 2
    assert f"{junk}: cannot read the .bin pickle" in capsys.readouterr().err

    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    assert eval_main([best, "--json", str(taken)]) == 2
    assert f"{taken} exists" in capsys.readouterr().err and taken.read_text() == "{}"

    assert eval_main([best, "--input_size", "32", "--device", "cpu"]) == 2
    assert "input_size: 32 was given, but" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main([best, best, best])
    assert torch.load(best, weights_only=True)["epoch"] == 1        # nothing was written over


def test_compare_scores_each_retrained_run_pair_by_pair_as_its_training_logged(two_runs):
    from virface.search.compare import per_pair_correctness
    from virface.search.runner import SearchOptions

    spec = {k: int(v) for k, v in (a.split("=") for a in TINY_SYNTHETIC[1::2])}
    options = SearchOptions(stage="virclass", compare="baseline", data={"synthetic": spec})
    metric = "test_synth_cfp_fp_acc"
    runs = {arm: [{"seed": 1, "checkpoint": path, metric: logged[metric]}]
            for arm, (path, logged) in zip(("virclass", "baseline"), two_runs)}
    correct = per_pair_correctness(options, runs, metric, say=lambda text: None)
    for arm, (_, logged) in zip(("virclass", "baseline"), two_runs):
        assert correct[arm].shape == (1, 40) and correct[arm].mean() == pytest.approx(logged[metric])
