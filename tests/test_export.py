"""virface-export: a checkpoint's backbone as ONNX, TorchScript or a state_dict, each checked
against the checkpoint's own embeddings after export; a failed check leaves no file behind."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from virface.backbones import build_backbone
from virface.checkpoint import save_checkpoint
from virface.export import ExportError, export_backbone, main, verification_batch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pretrain checkpoint whose BatchNorm statistics are not the defaults (so a backbone
    exported in training mode, or without its buffers, would give other embeddings)."""
    torch.manual_seed(0)
    backbone = build_backbone("mobilefacenet_s", feat_len=16, input_size=16)
    for module in backbone.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    path = str(tmp_path_factory.mktemp("ckpt") / "best.pt")
    save_checkpoint({"stage": "virface", "epoch": 3, "config": {},
                     "model": {"arch": "mobilefacenet_s", "feat_len": 16, "input_size": 16, "num_ids": 5},
                     "backbone": backbone.state_dict()}, path)
    return path, backbone.eval()


def embeddings(backbone, images):
    with torch.no_grad():
        return backbone(images)


def test_the_verification_batch_is_normalised_pixels():
    images = verification_batch(4, 16)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    # (x / 255 - 0.5) / 0.5 of integers 0..255: multiples of 1/127.5 in [-1, 1].
    steps = (images + 1.0) * 127.5
    assert torch.allclose(steps, steps.round(), atol=1e-4) and images.min() >= -1 and images.max() <= 1


def test_state_dict_export_round_trip(checkpoint, tmp_path, capsys):
    path, backbone = checkpoint
    result = export_backbone(path, "state_dict", str(tmp_path / "backbone.pt"))
    saved = torch.load(result.path, weights_only=True)
    assert saved["model"] == {"arch": "mobilefacenet_s", "feat_len": 16, "input_size": 16}
    rebuilt = build_backbone("mobilefacenet_s", feat_len=16, input_size=16)
    rebuilt.load_state_dict(saved["backbone"])
    images = verification_batch(3, 16, seed=5)
    assert torch.equal(embeddings(rebuilt.eval(), images), embeddings(backbone, images))
    assert result.max_abs_diff == 0.0
    assert "max |diff| = 0 " in capsys.readouterr().out


def test_torchscript_export_round_trip(checkpoint, tmp_path):
    path, backbone = checkpoint
    result = export_backbone(path, "torchscript", str(tmp_path / "backbone.ts"), batch=4)
    loaded = torch.jit.load(result.path).eval()
    images = verification_batch(5, 16, seed=7)           # another batch size than the export's
    assert torch.allclose(embeddings(loaded, images), embeddings(backbone, images), atol=1e-6)
    info = json.loads(open(result.info_path).read())
    assert info["format"] == "torchscript" and info["stage"] == "virface" and info["epoch"] == 3
    assert info["verification"] == {"batch": 4, "max_abs_diff": result.max_abs_diff,
                                    "checked_with": "torch.jit.load"}
    assert "[-1, 1]" in info["input"] and "not L2-normalised" in info["output"]


def test_onnx_export_round_trip_checked_with_onnxruntime(checkpoint, tmp_path, capsys):
    import onnx
    import onnxruntime

    path, backbone = checkpoint
    assert main([path, "--format", "onnx", "--output", str(tmp_path / "face.onnx")]) == 0
    out = capsys.readouterr().out
    assert "verified with onnxruntime (CPU) on 8 images: max |diff| = " in out
    onnx.checker.check_model(str(tmp_path / "face.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "face.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    images = verification_batch(3, 16, seed=11)          # the batch dimension is free
    [got] = session.run(["embeddings"], {"images": images.numpy()})
    np.testing.assert_allclose(got, embeddings(backbone, images).numpy(), atol=1e-5)
    assert oct(os.stat(tmp_path / "face.onnx").st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_default_output_sits_beside_the_checkpoint(checkpoint, tmp_path):
    path, _ = checkpoint
    result = export_backbone(path, "state_dict", say=lambda _: None)
    assert result.path == path[:-3] + ".backbone.pt" and os.path.exists(result.info_path)


def test_an_export_that_gives_other_embeddings_is_an_error_and_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import virface.export as export

    path, _ = checkpoint
    monkeypatch.setattr(export, "_run_torchscript", lambda p, images: export.torch.zeros(len(images), 16))
    with pytest.raises(ExportError, match=r"max \|diff\| 0\.\d+ against the checkpoint's backbone exceeds "
                                          r"0\.0001 x 1; nothing was written"):
        export_backbone(path, "torchscript", str(tmp_path / "bad.ts"), say=lambda _: None)
    assert os.listdir(tmp_path) == []


def test_onnx_without_its_packages_names_the_extra(checkpoint, tmp_path, monkeypatch, capsys):
    path, _ = checkpoint
    monkeypatch.setitem(sys.modules, "onnxscript", None)      # as if not installed
    assert main([path, "--format", "onnx", "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "needs the package 'onnxscript'" in err and "pip install 'virface[export]'" in err
    assert os.listdir(tmp_path) == []


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "x.pt"), "--format", "torchscript"]) == 2
    assert f"{tmp_path / 'x.pt'}: not a readable checkpoint" in capsys.readouterr().err
