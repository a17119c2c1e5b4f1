"""Image bytes to pixels and back: decoding to uint8 RGB, encoding, resizing, and the network's
input normalisation.

Every reader (RecordIO, image files, .bin pair sets) decodes through :func:`decode_rgb`; every
writer encodes through :func:`png_bytes` or :func:`jpeg_bytes`; every resize to the network's
input goes through :func:`resize_square`; every model input (training, evaluation, benchmarks) is
normalised by :func:`normalize_pixels`.

torchvision is imported by these functions on first use, not with this module: importing it
imports torch._dynamo too (through torchvision.ops), 1.4 s of CPU on the 2-core development
machine, which every trial process and Ray Train rank would pay at start-up though most never
decode, encode or resize an image (the built-in faces are made at the input size).
"""
from __future__ import annotations

import io

import numpy as np
import torch

from virface.errors import CorruptImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [-1, 1], the reference's (x - 0.5) / 0.5."""
    return images.float().div_(127.5).sub_(1.0)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) resized to ``size`` x ``size``, antialiased (torchvision's
    v2 resize)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, [size, size], antialias=True)


def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 (3, H, W) image as PNG bytes."""
    from torchvision.io import encode_png

    return encode_png(image).numpy().tobytes()


def jpeg_bytes(image: torch.Tensor, quality: int) -> bytes:
    """A uint8 (3, H, W) image as JPEG bytes of this quality (1-100)."""
    from torchvision.io import encode_jpeg

    return encode_jpeg(image, quality=quality).numpy().tobytes()


def decode_rgb(data: bytes | bytearray | memoryview | np.ndarray, what: str) -> torch.Tensor:
    """Decode encoded image bytes to a uint8 (3, H, W) RGB tensor.

    ``what`` names the file/record for the error. Raises ``CorruptImageError``.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
        else np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if buf.size == 0:
        raise CorruptImageError(f"{what}: empty image data")
    try:
        from torchvision.io import ImageReadMode, decode_image

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
