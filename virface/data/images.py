"""Image bytes to pixels: decoding to uint8 RGB, and the network's input normalisation.

Every reader (RecordIO, image files, .bin pair sets) decodes through :func:`decode_rgb`; every
model input (training, evaluation, benchmarks) is normalised by :func:`normalize_pixels`.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from virface.errors import CorruptImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [-1, 1], the reference's (x - 0.5) / 0.5."""
    return images.float().div_(127.5).sub_(1.0)


def decode_rgb(data: bytes | bytearray | memoryview | np.ndarray, what: str) -> torch.Tensor:
    """Decode encoded image bytes to a uint8 (3, H, W) RGB tensor.

    ``what`` names the file/record for the error. Raises ``CorruptImageError``.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
        else np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if buf.size == 0:
        raise CorruptImageError(f"{what}: empty image data")
    try:
        # frombuffer shares memory with a possibly read-only buffer; the copy keeps torch quiet.
        image = decode_image(torch.from_numpy(buf.copy()), mode=ImageReadMode.RGB)
    except RuntimeError as torch_error:
        # torchvision decodes jpeg/png/webp/gif only; BMP (and other PIL formats) go through PIL.
        image = _decode_with_pil(buf, what, torch_error)
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = (image.to(torch.float32) * (255.0 / torch.iinfo(image.dtype).max)).round()
        image = image.to(torch.uint8)
    return image


def _decode_with_pil(buf: np.ndarray, what: str, torch_error: Exception) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency, but keep the real cause
        raise CorruptImageError(f"{what}: cannot decode image ({torch_error})") from torch_error
    try:
        with Image.open(io.BytesIO(buf.tobytes())) as pil:
            array = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    except Exception as pil_error:  # PIL raises many types for bad data
        raise CorruptImageError(f"{what}: cannot decode image ({torch_error}; "
                                f"PIL: {pil_error})") from pil_error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_image_file(path: str) -> torch.Tensor:
    """Read and decode one image file to uint8 (3, H, W) RGB; ``CorruptImageError`` names it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptImageError(f"{path}: cannot read image ({e})") from e
    return decode_rgb(data, path)
