"""The instance diagnostics and the gate (virface.instance_diagnostics), on hand-built features
whose figures are worked out below, and wired into the generator and virface stages."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from virface.config import TrainConfig
from virface.instance_diagnostics import (IdentityLossError, identity_gate, instance_diagnostics,
                                          variation_sample)
from virface.metrics import INSTANCE_METRICS, stage_metric_names, tensorboard_tag

# Three pairs in 3-d: a and b of one identity at 60 degrees (cos 0.5) in the x-y plane; W's
# rows are the axes, so a's nearest W row is e_x (cos 1) ...
F_A = torch.tensor([[1.0, 0.0, 0.0]] * 3)
F_B = torch.tensor([[0.5, 0.75 ** 0.5, 0.0]] * 3)
W = torch.eye(3)


def returns(rows: torch.Tensor):
    """A deterministic sampler: every draw of source i is rows[i]."""
    return lambda sources, draws: rows.repeat(draws, 1)


def test_identity_keep_is_positive_for_a_generator_that_returns_f_b():
    d = instance_diagnostics(returns(F_B), F_A, F_B, W)
    assert d["vi_real_cos"] == pytest.approx(0.5)
    assert d["vi_identity_keep"] == pytest.approx(1.0 - 0.5)      # cos(f_b, f_b) - cos(f_a, f_b)


def test_identity_keep_is_negative_for_a_generator_that_returns_the_nearest_w_row():
    # a = (cos 20deg, 0, sin 20deg): nearest W row e_x; b rotated away from e_x in the x-y plane.
    a = torch.tensor([[0.9397, 0.0, 0.3420]])
    b = F.normalize(torch.tensor([[0.3, 0.8, 0.3420]]), dim=1)
    d = instance_diagnostics(returns(torch.tensor([[1.0, 0.0, 0.0]])), a, b, W)
    expected = float(b[0, 0]) - float(F.normalize(a, dim=1)[0] @ b[0])
    assert expected < 0
    assert d["vi_identity_keep"] == pytest.approx(expected, abs=1e-4)
    assert d["vi_w_pull"] == pytest.approx(1.0 - 0.9397, abs=1e-4)  # nearest-W cos 1 against 0.94


def test_the_draw_spread_of_a_deterministic_generator_is_one_and_of_a_noisy_one_below():
    assert instance_diagnostics(returns(F_B), F_A, F_B, W, draws=4)["vi_draw_cos"] == pytest.approx(1.0)
    torch.manual_seed(0)
    noisy = lambda sources, draws: F.normalize(sources.repeat(draws, 1) + torch.randn(draws * 3, 3), dim=1)
    assert instance_diagnostics(noisy, F_A, F_B, W)["vi_draw_cos"] < 0.99


def test_the_own_class_share_on_a_hand_built_case():
    # Sources e2, e3, e4 and (0.6, 0, 0, 0.8); W = e1 alone. Instances: source 0's is e2 (its own
    # class, cos 1, wins); source 1's is e1 (W wins); source 2's is (0.6, 0, 0, 0.8), cos 0.8
    # with its own and 1.0 with source 3's (loses); source 3's normalises to (0.486, 0, 0,
    # 0.874), cos 0.990 with its own against 0.874 and 0.486 (wins): 2 of 4.
    sources = torch.tensor([[0.0, 1, 0, 0], [0.0, 0, 1, 0], [0.0, 0, 0, 1], [0.6, 0.0, 0.0, 0.8]])
    weight = torch.tensor([[1.0, 0, 0, 0]])
    inst = torch.tensor([[0.0, 1, 0, 0], [1.0, 0, 0, 0], [0.6, 0.0, 0.0, 0.8], [0.5, 0.0, 0.0, 0.9]])
    d = instance_diagnostics(returns(inst), sources, sources, weight)
    assert d["vi_own_class_share"] == pytest.approx(2 / 4)
    # In groups of two virtual classes, source 2's instance competes with W and sources 2 and
    # 3, so it still loses: 2 / 4 again. Groups of one: source 2's instance (0.6, 0, 0, 0.8) has cos 0.8 with its own (0, 0, 0, 1) and 0.6
    # with W: it wins; source 3's instance has cos ~0.98 with its own: 3 / 4.
    assert instance_diagnostics(returns(inst), sources, sources, weight, virtual_classes=2)[
        "vi_own_class_share"] == pytest.approx(2 / 4)
    assert instance_diagnostics(returns(inst), sources, sources, weight, virtual_classes=1)[
        "vi_own_class_share"] == pytest.approx(3 / 4)


def test_the_gate_warns_and_refuses_when_identity_is_lost_unless_told_to_go_on(caplog):
    good = dict(zip(INSTANCE_METRICS, (0.97, 0.91, 0.01, 0.02, 0.5)))
    bad = {**good, "vi_identity_keep": -0.017}
    assert identity_gate(good, "runs/generator/best.pt") is True
    with pytest.raises(IdentityLossError, match=r"runs/generator/best.pt: its instances lose identity: "
                                                r"identity keep -0.017, draw cos 0.970 \(real same-identity cos 0.910\)"):
        identity_gate(bad, "runs/generator/best.pt")
    with caplog.at_level(logging.WARNING, logger="virface"):
        assert identity_gate(bad, "runs/generator/best.pt", go_on=True) is False
    assert "identity keep -0.017" in caplog.text


def test_the_diagnostics_are_named_metrics_of_the_generator_and_virface_stages():
    assert set(INSTANCE_METRICS) <= set(stage_metric_names("generator", []))
    assert set(INSTANCE_METRICS) <= set(stage_metric_names("virface", ["lfw"]))
    assert not set(INSTANCE_METRICS) & set(stage_metric_names("virclass", ["lfw"]))
    assert tensorboard_tag("vi_identity_keep") == "instances/vi_identity_keep"


def test_the_variation_sample_takes_whole_identities_of_two_or_more_images():
    labels = [0, 1, 1, 2, 2, 2, 3, 3, 4]
    idx = variation_sample(labels, 100)
    assert sorted(idx.tolist()) == [1, 2, 3, 4, 5, 6, 7]        # identities 0 and 4 have one image
    assert sorted(variation_sample(labels, 2).tolist()) in ([1, 2], [6, 7], [3, 4, 5])


def test_the_stages_report_the_diagnostics_each_epoch_and_select_the_generator_on_identity_keep(
        tmp_path, tiny_data, caplog):
    from virface.stages import run_stage

    tiny = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, unlabel_batch_size=4,
                steps_per_epoch=1, max_epoch=2, gen_num=2, tensorboard=False, device="cpu",
                diagnostic_pairs=8)
    pre = run_stage(TrainConfig(method="pretrain", **tiny), str(tmp_path / "pre"), data=tiny_data)
    gen = run_stage(TrainConfig(method="generator", best_metric="vi_identity_keep",
                                pretrained_file=pre.best_checkpoint, **tiny), str(tmp_path / "gen"), data=tiny_data)
    assert gen.best["metric"] == "vi_identity_keep" and gen.best["mode"] == "max"
    assert gen.best["value"] == max(h["vi_identity_keep"] for h in gen.history)
    with caplog.at_level(logging.INFO, logger="virface"):
        vf = run_stage(TrainConfig(method="virface", pretrained_file=gen.best_checkpoint, **tiny),
                       str(tmp_path / "vf"), data=tiny_data)
    assert f"virface starts from generator {gen.best_checkpoint} (its generator)" in caplog.text
    lines = [json.loads(line) for line in open(tmp_path / "vf" / "metrics.jsonl")]
    for record in lines + [json.loads(line) for line in open(tmp_path / "gen" / "metrics.jsonl")]:
        assert set(INSTANCE_METRICS) <= set(record)
        assert -2.0 <= record["vi_identity_keep"] <= 2.0 and 0.0 <= record["vi_own_class_share"] <= 1.0
    # The generator stage's frozen backbone: the real same-identity cosine does not move.
    assert gen.history[0]["vi_real_cos"] == gen.history[1]["vi_real_cos"]
    # The diagnostics draw from their own seeded stream: training is the same without them.
    off = run_stage(TrainConfig(method="virface", pretrained_file=gen.best_checkpoint,
                                **{**tiny, "diagnostic_pairs": 0}), str(tmp_path / "vf_off"), data=tiny_data)
    assert off.history[-1]["loss"] == vf.history[-1]["loss"]
    assert "vi_identity_keep" not in off.history[-1]


def test_the_benchmark_gate_refuses_a_generator_that_draws_a_w_row_unless_told_to_go_on(tmp_path, tiny_data):
    from virface.checkpoint import load_backbone, load_checkpoint, save_checkpoint
    from virface.evaluation.verification import extract_embeddings
    from virface.instance_diagnostics import diagnostic_pairs, generator_gate
    from virface.stages import run_stage

    tiny = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, unlabel_batch_size=4,
                steps_per_epoch=1, max_epoch=1, gen_num=2, tensorboard=False, device="cpu")
    pre = run_stage(TrainConfig(method="pretrain", **tiny), str(tmp_path / "pre"), data=tiny_data)
    gen = run_stage(TrainConfig(method="generator", pretrained_file=pre.best_checkpoint, **tiny),
                    str(tmp_path / "gen"), data=tiny_data)
    state = load_checkpoint(gen.best_checkpoint)
    # A decoder whose output is its bias, W's row 0: every instance is that class centre.
    state["generator"]["decoder.2.weight"].zero_()
    state["generator"]["decoder.2.bias"].copy_(state["head"]["weight"][0])
    path = save_checkpoint(state, str(tmp_path / "w_row.pt"))
    pairs = diagnostic_pairs(tiny_data)
    backbone = load_backbone(path)[0]
    f_a, f_b = (extract_embeddings(backbone, im, flip=False) for im in (pairs.images_a, pairs.images_b))
    w0 = F.normalize(state["head"]["weight"][0], dim=0)
    expected = float((f_b @ w0).mean() - (f_a * f_b).sum(1).mean())
    assert expected < 0          # on these random faces a and b are closer than W's row 0 is to b
    with pytest.raises(IdentityLossError, match=f"generator {path}: its instances lose identity"):
        generator_gate(path, tiny_data)
    figures = generator_gate(path, tiny_data, go_on=True)
    assert figures["vi_identity_keep"] == pytest.approx(expected, abs=1e-5)
    assert figures["vi_draw_cos"] == pytest.approx(1.0)
