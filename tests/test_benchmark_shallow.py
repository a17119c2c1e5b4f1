"""benchmarks/shallow_data.py in its smallest mode writes a table, three PNGs and the raw JSON,
and every method and ablation point appears in them."""
import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("baseline", "virclass", "virface_alternate", "virface_joint")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "shallow_data", os.path.join(REPO, "benchmarks", "shallow_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_writes_table_plots_and_json_with_every_method(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "out"
    results = bench.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work")])

    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    plan = saved["plan"]
    assert plan["name"] == "smoke" and plan["steps_per_epoch"] == 1

    # One final-epoch record per method and seed, each scored on the three pair sets.
    for method in ("pretrain_start", *METHODS):
        runs = [r for r in saved["records"] if r["kind"] == method
                and "gen_num" not in r and "unlabeled_percent" not in r]
        assert [r["seed"] for r in runs] == plan["seeds"], method
        for run in runs:
            for pair_set in ("synth_lfw", "synth_cfp_ff", "synth_cfp_fp"):
                assert 0.0 <= run["final"][f"{pair_set}_acc"] <= 1.0
                assert 0.0 <= run["final"][f"{pair_set}_tar_far1e-3"] <= 1.0
            assert [epoch["steps"] for epoch in run["train"]] == [1] * len(run["train"])
    assert set(saved["summary"]["methods"]) == {"pretrain_start", *METHODS}

    # Ablation points: every gen_num and unlabeled fraction of the plan; 0 % is the baseline.
    summary = saved["summary"]
    assert list(summary["gen_num"]) == [str(g) for g in plan["gen_nums"]]
    assert list(summary["unlabeled_percent"]) == [str(p) for p in plan["unlabeled_percents"]]
    assert summary["unlabeled_percent"]["0"] == summary["methods"]["baseline"]
    half = [r for r in saved["records"] if r.get("unlabeled_percent") == 50]
    assert half and all(0 < r["n_unlabeled_images"] < saved["data"]["unlabeled_images"] for r in half)
    gen0 = [r for r in saved["records"] if r.get("gen_num") == 0]
    assert gen0 and all(r["config"]["gen_num"] == 0 for r in gen0)

    # The markdown table names every method, and the same table is printed.
    table = (out / "table.md").read_text()
    assert table.count("ArcFace baseline") == 1
    for label in ("VirClass", "VirFace, alternate", "VirFace, joint"):
        assert table.count(label) == 2, label      # the absolute table and the difference table
    assert "gen_num" in table and "unlabeled identities kept" in table
    assert table.splitlines()[2] in capsys.readouterr().out

    for name in ("methods.png", "gen_num.png", "unlabeled.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
