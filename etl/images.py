"""Camera frames (JPEG/PNG files or their bytes) → arrays, with truncation detected.

OpenCV happily decodes a truncated JPEG into a partly grey image (it only prints
"Premature end of JPEG file" on stderr), so the file's end is checked first: a JPEG must end
with its EOI marker ``FF D9`` (trailing zero padding allowed), a PNG with its ``IEND``
chunk. Everything else that fails to decode is a :class:`etl.errors.FrameError` too.

Reduced-scale JPEG decoding (opt-in, for the ETL): inside ``with decode_at_least(rgb=(h, w),
ir=(h, w)):`` a JPEG whose target size is at most half its own is decoded by libjpeg at
1/2, 1/4 or 1/8 scale (``cv2.IMREAD_REDUCED_*``: the scaling is done in the DCT, so the
decode itself is 2–3× cheaper), never below the target size, so the later INTER_AREA resize
still only shrinks. The result is close to, not identical with, full decode + INTER_AREA
(see ``tests/test_etl_speed_equivalence.py`` for the measured tolerance). PNG and other
formats, and everything outside the context, decode at full size.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

import cv2
import numpy as np

from etl.errors import FrameError

__all__ = ["read_image", "decode_image", "decode_at_least", "jpeg_info", "jpeg_reduction"]

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


# mode ("rgb" / "ir") → the smallest (h, w) the consumer needs; None: decode at full size
_AT_LEAST: contextvars.ContextVar[dict[str, tuple[int, int]] | None] = contextvars.ContextVar(
    "raceformer_decode_at_least", default=None
)
_REDUCED = {  # (reduction, colour) → imdecode flag
    (2, True): cv2.IMREAD_REDUCED_COLOR_2,
    (4, True): cv2.IMREAD_REDUCED_COLOR_4,
    (8, True): cv2.IMREAD_REDUCED_COLOR_8,
    (2, False): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, False): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, False): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@contextlib.contextmanager
def decode_at_least(rgb: tuple[int, int] | None = None, ir: tuple[int, int] | None = None):
    """Within the block, JPEGs of a mode with a size given here decode at reduced scale
    (the largest of 1/2, 1/4, 1/8 that still covers the (h, w)); see the module doc."""
    sizes = {k: (int(v[0]), int(v[1])) for k, v in (("rgb", rgb), ("ir", ir)) if v is not None}
    token = _AT_LEAST.set(sizes or None)
    try:
        yield
    finally:
        _AT_LEAST.reset(token)


def jpeg_info(data) -> tuple[int, int, int, int] | None:
    """(height, width, components, bits) from a JPEG's SOF segment; None if not found."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            i += 2
            continue
        seg = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            if i + 10 > n:
                return None
            bits = data[i + 4]
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return h, w, data[i + 9], bits
        if marker == 0xDA:  # start of scan before any SOF
            return None
        i += 2 + seg
    return None


def jpeg_reduction(src_hw: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """The largest r in (8, 4, 2) with target ≤ source / r on both axes (libjpeg rounds the
    reduced size up), else 1."""
    for r in (8, 4, 2):
        if all(t <= s // r for s, t in zip(src_hw, target_hw, strict=True)):
            return r
    return 1


def _imdecode_flag(data: bytes, mode: str) -> int:
    """The imdecode flag for ``mode``: reduced when asked for and possible (an 8-bit JPEG;
    colour for RGB and for colour IR, which is then converted to grey as at full size)."""
    full = cv2.IMREAD_COLOR if mode == "rgb" else cv2.IMREAD_UNCHANGED
    sizes = _AT_LEAST.get()
    if not sizes or mode not in sizes or data[:2] != _JPEG_SOI:
        return full
    info = jpeg_info(data)
    if info is None or info[3] != 8:
        return full
    target = sizes[mode]
    if b"Exif\x00" in data[:65536]:  # OpenCV applies an EXIF rotation: cover either orientation
        target = (max(target), max(target))
    r = jpeg_reduction(info[:2], target)
    if r == 1:
        return full
    return _REDUCED[r, mode == "rgb" or info[2] >= 3]


def decode_image(data: bytes, mode: str = "rgb", where: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes → array.

    ``mode="rgb"``: uint8 (H, W, 3) in RGB order (grayscale input is expanded).
    ``mode="ir"``: (H, W) uint8 or uint16 as stored (read unchanged; colour → grayscale).
    Inside :func:`decode_at_least` a JPEG may come back at 1/2, 1/4 or 1/8 of its size.
    """
    if mode not in ("rgb", "ir"):
        raise ValueError(f"decode_image: mode must be 'rgb' or 'ir', not {mode!r}")
    data = bytes(data)
    _check_complete(data, where)
    buf = np.frombuffer(data, np.uint8)
    flag = _imdecode_flag(data, mode)
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
