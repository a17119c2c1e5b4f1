"""The stage table: consistent rows, and a new stage is one row plus a step function."""
import ast
import os

import pytest

from virface.checkpoint import load_checkpoint
from virface.config import TrainConfig
from virface.stage_table import STAGES, StageSpec, producer_of, stage_chain
from virface.stages import run_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_stage_starts_from_what_its_chain_trains():
    for name, spec in STAGES.items():
        chain = stage_chain(name)
        assert chain[-1] == name and STAGES[chain[0]].is_first
        trained_upstream = {part for stage in chain[:-1] for part in STAGES[stage].trains}
        assert set(spec.needs) <= trained_upstream, name
        assert callable(spec.step_function())


def test_who_produces_each_checkpoint_part():
    assert [producer_of(p) for p in ("backbone", "head", "generator")] == ["pretrain", "pretrain", "generator"]
    assert [s for s, spec in STAGES.items() if spec.uses_unlabeled] == ["virclass", "virface"]
    assert [s for s, spec in STAGES.items() if not spec.trains_backbone] == ["generator"]


def test_no_module_compares_stage_names_outside_the_table():
    names = set(STAGES)
    offenders = []
    for folder, _, files in os.walk(os.path.join(REPO, "virface")):
        for file in files:
            path = os.path.join(folder, file)
            if not file.endswith(".py") or file == "stage_table.py":
                continue
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.Compare):
                    operands = [node.left, *node.comparators]
                    values = [e for o in operands for e in (o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o])]
                    if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                        offenders.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert offenders == []


def test_a_new_stage_is_a_row_in_the_table(tmp_path, tiny_data, monkeypatch):
    # "continue": pretrain's step from pretrain's checkpoint, labeled data only: a baseline
    # continuation, added without touching the loop, the checkpoints or the config.
    row = StageSpec("continue", upstream="pretrain", needs=("backbone", "head"), trains=("backbone", "head"),
                    uses_unlabeled=False, loss_terms=("loss_arcface",), step="virface.steps:pretrain_step")
    monkeypatch.setitem(STAGES, "continue", row)
    tiny = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, steps_per_epoch=2, max_epoch=1,
                tensorboard=False, device="cpu")
    first = run_stage(TrainConfig(method="pretrain", **tiny), str(tmp_path / "pre"), data=tiny_data)
    result = run_stage(TrainConfig(method="continue", pretrained_file=first.best_checkpoint, **tiny),
                       str(tmp_path / "cont"), data=tiny_data)
    state = load_checkpoint(result.best_checkpoint)
    assert state["stage"] == "continue" and state["generator"] is None
    assert "loss_arcface" in result.history[-1] and "tiny_pairs_acc" in result.history[-1]
    with pytest.raises(Exception, match="stage continue needs a checkpoint with backbone"):
        run_stage(TrainConfig(method="continue", **tiny), str(tmp_path / "none"), data=tiny_data)
