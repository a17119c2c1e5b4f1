"""benchmarks/instance_diagnostics.py on a tiny chain of the built-in faces: one line and one
JSON record per generator and covariance variant, with the figures the gate computes."""
import json
import os
import sys

import pytest

from virface.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = dict(n_labeled_ids=8, images_per_labeled_id=4, n_unlabeled_ids=12, n_val_ids=8, val_pairs=40,
             image_size=16)


def test_it_measures_the_generator_and_covariance_transfer_of_a_checkpoint(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import instance_diagnostics as bench
    finally:
        sys.path.pop(0)
    from virface.stages import run_stage

    tiny = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, steps_per_epoch=1, max_epoch=1,
                tensorboard=False, device="cpu", synthetic=SYNTH, log_every=0)
    pre = run_stage(TrainConfig(method="pretrain", **tiny), str(tmp_path / "pre"))
    gen = run_stage(TrainConfig(method="generator", pretrained_file=pre.best_checkpoint, **tiny),
                    str(tmp_path / "gen"))
    out = tmp_path / "figures.json"
    assert bench.main([gen.best_checkpoint, "--covariance", "0", "4", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["instances"] for r in records] == ["generator", "covariance rank full x1", "covariance rank 4 x1"]
    # One backbone, one set of pairs: the real same-identity cosine is the same for every variant.
    assert len({round(r["vi_real_cos"], 6) for r in records}) == 1
    assert gen.history[-1]["vi_identity_keep"] == pytest.approx(records[0]["vi_identity_keep"], abs=1e-5)
    assert capsys.readouterr().out.count("identity keep") == 3
