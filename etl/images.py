"""Camera frames (JPEG/PNG files or their bytes) → arrays, with truncation detected.

OpenCV happily decodes a truncated JPEG into a partly grey image (it only prints
"Premature end of JPEG file" on stderr), so the file's end is checked first: a JPEG must end
with its EOI marker ``FF D9`` (trailing zero padding allowed), a PNG with its ``IEND``
chunk. Everything else that fails to decode is a :class:`etl.errors.FrameError` too.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from etl.errors import FrameError

__all__ = ["read_image", "decode_image"]

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _check_complete(data: bytes, where: str) -> None:
    if not data:
        raise FrameError(where, "empty file")
    if data[:2] == _JPEG_SOI:
        if not data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
            raise FrameError(where, "truncated JPEG (no end-of-image marker)")
    elif data[:8] == _PNG_SIG:
        if b"IEND" not in data[-32:]:
            raise FrameError(where, "truncated PNG (no IEND chunk)")


def decode_image(data: bytes, mode: str = "rgb", where: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes → array.

    ``mode="rgb"``: uint8 (H, W, 3) in RGB order (grayscale input is expanded).
    ``mode="ir"``: (H, W) uint8 or uint16 as stored (read unchanged; colour → grayscale).
    """
    if mode not in ("rgb", "ir"):
        raise ValueError(f"decode_image: mode must be 'rgb' or 'ir', not {mode!r}")
    data = bytes(data)
    _check_complete(data, where)
    buf = np.frombuffer(data, np.uint8)
    flag = cv2.IMREAD_COLOR if mode == "rgb" else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(buf, flag)
    except cv2.error as e:
        raise FrameError(where, f"cannot decode image: {str(e).strip().splitlines()[-1]}") from None
    if img is None or img.size == 0:
        raise FrameError(where, "cannot decode image (corrupt or not an image)")
    if mode == "rgb":
        if img.dtype != np.uint8:  # IMREAD_COLOR gives 8-bit; stay safe
            img = (img // 257).astype(np.uint8) if img.dtype == np.uint16 else img.astype(np.uint8)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        else:
            code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            img = cv2.cvtColor(img, code)
    if img.dtype not in (np.uint8, np.uint16):
        raise FrameError(where, f"unsupported IR pixel type {img.dtype}")
    return np.ascontiguousarray(img)


def read_image(path, mode: str = "rgb", where: str | None = None) -> np.ndarray:
    """Read a JPEG/PNG file (or its bytes) → array; see :func:`decode_image` for ``mode``.

    Raises :class:`FrameError` ``<path>: <reason>`` for a missing, truncated or corrupt file.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        return decode_image(path, mode, where or "<bytes>")
    where = where or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FrameError(where, f"cannot read: {e.strerror or e}") from None
    return decode_image(data, mode, where)
