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
    assert bench.main([gen.best_checkpoint, "--covariance", "0", "4", "--cov_shrink", "0", "1",
                       "--json", str(out), "--plot", str(tmp_path / "instances.png")]) == 0
    records = json.loads(out.read_text())
    assert [r["instances"] for r in records] == [
        "generator", "covariance rank full scale 1 shrink 0", "covariance rank full scale 1 shrink 1",
        "covariance rank 4 scale 1 shrink 0", "covariance rank 4 scale 1 shrink 1"]
    # One backbone, one set of pairs: the real same-identity cosine is the same for every variant.
    assert len({round(r["vi_real_cos"], 6) for r in records}) == 1
    assert gen.history[-1]["vi_identity_keep"] == pytest.approx(records[0]["vi_identity_keep"], abs=1e-5)
    # Shrinking the sources towards their estimated centres changes what is drawn.
    assert records[1]["vi_draw_cos"] != records[2]["vi_draw_cos"]
    assert capsys.readouterr().out.count("identity keep") == 5
    assert (tmp_path / "instances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The figure again from the JSON alone, nothing measured.
    again = tmp_path / "again.png"
    assert bench.main(["--from-json", str(out), "--plot", str(again)]) == 0 and again.stat().st_size > 10_000
