"""``virface-export``: a checkpoint's backbone as ONNX, TorchScript or a plain state_dict, checked
after export against the checkpoint's own backbone on a batch of images.

    virface-export runs/virface/best.pt --format onnx          # -> runs/virface/best.onnx
    virface-export runs/virface/best.pt --format torchscript   # -> runs/virface/best.torchscript.pt
    virface-export runs/virface/best.pt --format state_dict --output backbone.pt

What the exported model takes and gives (the same as in training and evaluation here):
  input   float32 (B, 3, S, S), RGB, S the checkpoint's input_size (112 for real data), pixels
          normalised as (x / 255 - 0.5) / 0.5, i.e. uint8 [0, 255] -> [-1, 1]
          (virface.data.images.normalize_pixels); faces aligned as the training data were
  output  float32 (B, feat_len) embeddings, not L2-normalised: normalise each row before cosine
          similarity; the verification here also adds the embedding of the horizontally flipped
          image before normalising (flip test-time augmentation)

Each export writes ``<output>.json`` beside it: the model description, this input contract, the
source checkpoint and the verification's max |difference|. ONNX needs ``pip install
'virface[export]'`` (onnx, onnxscript for the exporter, onnxruntime for the check).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from virface.errors import VirFaceError
from virface.fileio import _umask, write_text_atomic
from virface.options import line_buffered_output

FORMATS = ("onnx", "torchscript", "state_dict")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "state_dict": ".backbone.pt"}
INPUT_CONTRACT = {
    "input": "float32 (B, 3, S, S) RGB, S = input_size; pixels (x / 255 - 0.5) / 0.5: uint8 [0, 255] -> [-1, 1]",
    "output": "float32 (B, feat_len) embeddings, not L2-normalised (normalise rows before cosine similarity)",
    "input_name": "images",
    "output_name": "embeddings",
}
EXPORT_EXTRA = "pip install 'virface[export]'"


class ExportError(VirFaceError):
    """An export that cannot be made, or whose result does not give the checkpoint's embeddings."""


@dataclass
class ExportResult:
    path: str
    info_path: str
    max_abs_diff: float
    batch: int


def verification_batch(batch: int, input_size: int, seed: int = 0) -> torch.Tensor:
    """(batch, 3, S, S) float32 images in [-1, 1], normalised as the input contract says: uint8
    pixels drawn at random, so every input value the model can meet is a possible one."""
    from virface.data.images import normalize_pixels

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, 3, input_size, input_size), generator=generator, dtype=torch.uint8)
    return normalize_pixels(pixels)


def _require(module: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportError(f"{why} needs the package {module!r}, which is not installed ({exc}); "
                          f"{EXPORT_EXTRA}") from None


def _write_onnx(backbone: nn.Module, example: torch.Tensor, path: str, opset: int | None) -> None:
    _require("onnx", "the ONNX export")
    _require("onnxscript", "the ONNX exporter of torch")
    batch = torch.export.Dim("batch", min=1)
    # The batch dimension stays free: a deployment batches as it likes.
    program = torch.onnx.export(backbone, (example,), None, input_names=["images"], output_names=["embeddings"],
                                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    program.save(path)


def _run_onnx(path: str, images: torch.Tensor) -> torch.Tensor:
    onnxruntime = _require("onnxruntime", "checking the ONNX export")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    [output] = session.run(["embeddings"], {"images": images.numpy()})
    return torch.from_numpy(output)


def _write_torchscript(backbone: nn.Module, example: torch.Tensor, path: str) -> None:
    # torch marks TorchScript deprecated in favour of torch.export; deployments that load
    # TorchScript (C++ libtorch, older runtimes) still need it, and the warning is not ours to act on.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(backbone, (example,), check_trace=False)
        torch.jit.save(traced, path)


def _run_torchscript(path: str, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(path, map_location="cpu").eval()
        return module(images)


def _write_state_dict(backbone: nn.Module, meta: dict[str, Any], path: str) -> None:
    torch.save({"model": meta, "backbone": backbone.state_dict()}, path)


def _run_state_dict(path: str, images: torch.Tensor) -> torch.Tensor:
    """Rebuilt as a user would: the registry's backbone by name, the weights loaded strictly."""
    from virface.backbones import build_backbone

    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved["model"]
    backbone = build_backbone(meta["arch"], feat_len=meta["feat_len"], input_size=meta["input_size"])
    backbone.load_state_dict(saved["backbone"], strict=True)
    with torch.no_grad():
        return backbone.eval()(images)


def default_output(checkpoint: str, fmt: str) -> str:
    base = checkpoint[:-3] if checkpoint.endswith(".pt") else checkpoint
    return base + SUFFIXES[fmt]


def export_backbone(checkpoint: str, fmt: str, output: str | None = None, *, batch: int = 8,
                    tolerance: float = 1e-4, opset: int | None = None, say=print) -> ExportResult:
    """Export the backbone of ``checkpoint`` (any stage's) as ``fmt`` to ``output`` and check it:
    the exported model's embeddings of a batch of ``batch`` images against the checkpoint's
    backbone's, in eval mode on the CPU. The max |difference| is printed and recorded; above
    ``tolerance`` (relative to the largest |embedding| value, at least 1) it is an ExportError
    and nothing is left under ``output``. The file appears only once it has passed."""
    from virface.checkpoint import load_backbone, model_meta

    if fmt not in FORMATS:
        raise ExportError(f"format: {fmt!r} is not one of {list(FORMATS)}")
    if batch < 1:
        raise ExportError(f"batch: {batch} must be >= 1")
    backbone, state = load_backbone(checkpoint, "cpu")
    meta = {k: v for k, v in model_meta(state, checkpoint).items() if k in ("arch", "feat_len", "input_size")}
    output = os.path.abspath(output or default_output(checkpoint, fmt))
    if os.path.isdir(output):
        raise ExportError(f"output: {output} is a folder; give a file name")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    images = verification_batch(batch, meta["input_size"])
    with torch.no_grad():
        expected = backbone(images)
    say(f"exporting the {meta['arch']} backbone of {checkpoint} (a {state.get('stage')} checkpoint, "
        f"epoch {state.get('epoch')}; input {batch} x 3 x {meta['input_size']} x {meta['input_size']}, "
        f"embeddings of {meta['feat_len']}) as {fmt} ...")
    # Written beside the output and renamed once verified: a failed export leaves nothing behind.
    fd, scratch = tempfile.mkstemp(prefix=".export-", suffix=SUFFIXES[fmt], dir=os.path.dirname(output))
    os.fchmod(fd, 0o666 & ~_umask())          # mkstemp's 0600 would follow the file when renamed
    os.close(fd)
    try:
        if fmt == "onnx":
            _write_onnx(backbone, images, scratch, opset)
            got = _run_onnx(scratch, images)
            _require("onnx", "the ONNX check").checker.check_model(scratch)
        elif fmt == "torchscript":
            _write_torchscript(backbone, images, scratch)
            got = _run_torchscript(scratch, images)
        else:
            _write_state_dict(backbone, meta, scratch)
            got = _run_state_dict(scratch, images)
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(f"{fmt} export of {checkpoint}: embeddings of shape {tuple(got.shape)}, "
                              f"the checkpoint's backbone gives {tuple(expected.shape)}")
        diff = float((got.float() - expected).abs().max())
        largest = float(expected.abs().max())
        scale = max(1.0, largest)
        checked_with = {"onnx": "onnxruntime (CPU)", "torchscript": "torch.jit.load",
                        "state_dict": "the registry's backbone with the weights loaded"}[fmt]
        say(f"verified with {checked_with} on {batch} images: max |diff| = {diff:.3g} "
            f"(largest |embedding value| {largest:.3g}; accepted up to {tolerance * scale:.3g})")
        if not diff <= tolerance * scale:
            raise ExportError(f"{fmt} export of {checkpoint}: max |diff| {diff:.3g} against the checkpoint's "
                              f"backbone exceeds {tolerance:g} x {scale:.3g}; nothing was written")
        os.replace(scratch, output)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    info_path = output + ".json"
    write_text_atomic(info_path, json.dumps({
        "format": fmt, "file": os.path.basename(output), "source_checkpoint": os.path.abspath(checkpoint),
        "stage": state.get("stage"), "epoch": state.get("epoch"), "model": meta, **INPUT_CONTRACT,
        "verification": {"batch": batch, "max_abs_diff": diff, "checked_with": checked_with},
    }, indent=2) + "\n")
    say(f"wrote {output} and {info_path}")
    return ExportResult(output, info_path, diff, batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virface-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint of any stage (best.pt, epoch_NNN.pt)")
    parser.add_argument("--format", choices=FORMATS, required=True, help="what to write")
    parser.add_argument("--output", "-o", metavar="PATH",
                        help="the file to write (default: CKPT with .onnx, .torchscript.pt or .backbone.pt)")
    parser.add_argument("--batch", type=int, default=8, help="images in the verification batch (default: 8)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest max |diff| accepted, relative to the largest |embedding| value "
                             "(default: 1e-4)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    line_buffered_output()
    args = build_parser().parse_args(argv)
    try:
        export_backbone(args.checkpoint, args.format, args.output, batch=args.batch,
                        tolerance=args.tolerance, opset=args.opset)
    except VirFaceError as exc:
        print(f"virface-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
