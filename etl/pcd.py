"""Point Cloud Data (PCD v0.7) files: read and write, all three encodings.

The format (PCL's ``.pcd``): a text header of ``KEY value…`` lines (``#`` comments allowed) —
VERSION, FIELDS, SIZE, TYPE, COUNT, WIDTH, HEIGHT, VIEWPOINT, POINTS, DATA — then the data:

- ``ascii``: one point per line, whitespace-separated values;
- ``binary``: packed little-endian records, one per point (array of structs);
- ``binary_compressed``: ``uint32 compressed_size, uint32 uncompressed_size`` then an LZF
  block which decompresses to the fields one after another (struct of arrays: all of the first
  field's values, then all of the second's, …).

Fields are found by name and may come in any order; ``COUNT`` > 1 gives an (N, count) array
of SIZE × COUNT bytes per point; fields named ``_`` are padding and are skipped, and a field
with ``COUNT`` 0 (PCL writes ``_ … COUNT 0`` beside padding of 4, 6 or 12 bytes) occupies no
bytes and is left out. Bytes after the header's WIDTH × HEIGHT points (some writers leave
some) are ignored with a :class:`PCDWarning` of kind ``"trailing bytes"``; a file shorter
than its header says is a bad frame. Binary records are decoded with a single
``np.frombuffer`` over a structured dtype (no per-point Python).

Every failure is a :class:`etl.errors.FrameError` whose message is ``<file>: <reason>``.
"""

from __future__ import annotations

import bisect
import io
import re
import struct
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from etl.errors import FrameError

try:  # compiled liblzf (the optional `lzf` extra: python-lzf); the pure decoder below otherwise
    import lzf as _clzf
except ImportError:  # pragma: no cover — depends on the install
    _clzf = None

__all__ = [
    "PCDHeader",
    "PCDWarning",
    "lzf_compress",
    "lzf_decompress",
    "lzf_decompress_py",
    "parse_header",
    "points_xyzi",
    "radar_points",
    "read_pcd",
    "write_pcd",
]

ENCODINGS = ("ascii", "binary", "binary_compressed")
_TYPES = {("F", 2), ("F", 4), ("F", 8), ("I", 1), ("I", 2), ("I", 4), ("I", 8),
          ("U", 1), ("U", 2), ("U", 4), ("U", 8)}  # fmt: skip
_NUMPY_KIND = {"F": "f", "I": "i", "U": "u"}
_MAX_HEADER = 1 << 16  # a header longer than this is not a PCD header

# Names under which radar drivers publish the Doppler (radial) velocity, most specific first.
RADAR_VELOCITY_NAMES = (
    "velocity", "doppler", "doppler_velocity", "radial_velocity", "v_r", "vr", "v",
    "vx_comp", "vrel", "v_rel", "vrad", "range_rate", "rangerate",
)  # fmt: skip
INTENSITY_NAMES = ("intensity", "reflectivity", "i", "remission")


class PCDWarning(UserWarning):
    """Something in a PCD file was repaired (NaN/inf points dropped, trailing bytes ignored);
    the frame is still used. ``kind`` names the repair (for counting per drive)."""

    def __init__(self, message: str, kind: str = "pcd"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PCDHeader:
    fields: tuple[str, ...]
    sizes: tuple[int, ...]
    types: tuple[str, ...]
    counts: tuple[int, ...]
    width: int
    height: int
    points: int
    viewpoint: tuple[float, ...]
    data: str  # ascii | binary | binary_compressed
    version: str = "0.7"

    @property
    def point_size(self) -> int:
        """Bytes of one point, padding included."""
        return sum(s * c for s, c in zip(self.sizes, self.counts, strict=True))

    def numpy_type(self, k: int) -> np.dtype:
        return np.dtype(f"<{_NUMPY_KIND[self.types[k]]}{self.sizes[k]}")

    def named(self) -> list[int]:
        """Indices of the real fields: not padding ``_``, not COUNT 0 (no bytes)."""
        return [k for k, f in enumerate(self.fields) if f != "_" and self.counts[k] > 0]


# --------------------------------------------------------------------------- header
def _ints(key: str, vals: list[str], where: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in vals)
    except ValueError:
        raise FrameError(where, f"bad PCD header: {key} {' '.join(vals)!r}") from None


def parse_header(data: bytes | memoryview, where: str = "<bytes>") -> tuple[PCDHeader, int]:
    """Parse the text header; return it and the byte offset where the data starts."""
    head = bytes(data[:_MAX_HEADER])
    m = re.search(rb"^[ \t]*DATA[ \t]+(\S+)[ \t]*\r?(\n|$)", head, re.MULTILINE)
    if m is None:
        reason = "empty file" if not head else "not a PCD file (no DATA line in the header)"
        raise FrameError(where, reason)
    start = m.end()
    enc = m.group(1).decode("ascii", "replace").lower()
    if enc not in ENCODINGS:
        raise FrameError(where, f"bad PCD header: unknown DATA encoding {enc!r}")
    keys: dict[str, list[str]] = {}
    try:
        text = head[: m.start()].decode("ascii")
    except UnicodeDecodeError:
        raise FrameError(where, "not a PCD file (binary bytes in the header)") from None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, *vals = line.split()
        keys[key.upper()] = vals
    if "FIELDS" not in keys:
        raise FrameError(where, "bad PCD header: no FIELDS line")
    fields = tuple(keys["FIELDS"])
    nf = len(fields)
    if nf == 0:
        raise FrameError(where, "bad PCD header: FIELDS is empty")
    if "SIZE" not in keys or "TYPE" not in keys:
        raise FrameError(where, "bad PCD header: SIZE or TYPE missing")
    sizes = _ints("SIZE", keys["SIZE"], where)
    types = tuple(t.upper() for t in keys["TYPE"])
    counts = _ints("COUNT", keys["COUNT"], where) if "COUNT" in keys else (1,) * nf
    for key, vals in (("SIZE", sizes), ("TYPE", types), ("COUNT", counts)):
        if len(vals) != nf:
            raise FrameError(where, f"bad PCD header: {len(vals)} {key} entries for {nf} FIELDS")
    for f, s, t, c in zip(fields, sizes, types, counts, strict=True):
        if (t, s) not in _TYPES:
            raise FrameError(where, f"bad PCD header: field {f!r} has TYPE {t} SIZE {s}")
        if c < 0:
            raise FrameError(where, f"bad PCD header: field {f!r} has COUNT {c}")
    named = [f for f, c in zip(fields, counts, strict=True) if f != "_" and c > 0]
    dup = sorted({f for f in named if named.count(f) > 1})
    if dup:
        raise FrameError(where, f"bad PCD header: duplicate field {dup[0]!r}")
    width = _ints("WIDTH", keys.get("WIDTH", ["-1"])[:1], where)[0]
    height = _ints("HEIGHT", keys.get("HEIGHT", ["1"])[:1], where)[0]
    if "POINTS" in keys:
        points = _ints("POINTS", keys["POINTS"][:1], where)[0]
    elif width >= 0:
        points = width * height
    else:
        raise FrameError(where, "bad PCD header: neither POINTS nor WIDTH")
    if width < 0:
        width = points
    if points < 0 or height < 0:
        raise FrameError(where, f"bad PCD header: POINTS {points} HEIGHT {height}")
    if width * height != points:
        raise FrameError(
            where, f"bad PCD header: WIDTH {width} × HEIGHT {height} ≠ POINTS {points}"
        )
    try:
        viewpoint = tuple(float(v) for v in keys.get("VIEWPOINT", "0 0 0 1 0 0 0".split()))
    except ValueError:
        raise FrameError(where, "bad PCD header: VIEWPOINT is not 7 numbers") from None
    hdr = PCDHeader(
        fields, sizes, types, counts, width, height, points, viewpoint, enc,
        version=" ".join(keys.get("VERSION", ["0.7"])),
    )  # fmt: skip
    return hdr, start


# --------------------------------------------------------------------------- LZF
HAVE_COMPILED_LZF = _clzf is not None


def lzf_decompress(src: bytes, expected: int) -> bytes:
    """Decompress one LZF block of known decompressed size: with the compiled liblzf
    (``python-lzf``, ``uv sync --extra lzf``) when it is installed, else
    :func:`lzf_decompress_py`. Same bytes either way; ``ValueError`` on corrupt input.
    """
    if _clzf is None or expected == 0:
        return lzf_decompress_py(src, expected)
    out = _clzf.decompress(src, expected)  # ValueError on corrupt data
    if out is None:
        raise ValueError(f"LZF data decompresses to more than the {expected} bytes header says")
    if len(out) != expected:
        raise ValueError(f"LZF data decompresses to {len(out)} bytes, header says {expected}")
    return out


def lzf_decompress_py(src: bytes, expected: int) -> bytes:
    """Decompress one LZF block (liblzf's format) of known decompressed size, in pure Python.

    A control byte ``c < 32`` is a literal run of ``c + 1`` bytes; otherwise ``c >> 5`` (7 means
    "plus the next byte") + 2 bytes are copied from ``((c & 31) << 8 | next) + 1`` bytes back.
    One Python step per token; literals and copies are slice operations.
    Raises ``ValueError`` on corrupt or truncated input.
    """
    out = bytearray()
    i, n = 0, len(src)
    try:
        while i < n:
            c = src[i]
            i += 1
            if c < 32:
                j = i + c + 1
                if j > n:
                    raise ValueError("literal run past the end of the data")
                out += src[i:j]
                i = j
                continue
            length = c >> 5
            if length == 7:
                length += src[i]
                i += 1
            ref = len(out) - ((c & 31) << 8) - src[i] - 1
            i += 1
            length += 2
            if ref < 0:
                raise ValueError("back-reference before the start of the data")
            end = ref + length
            if end <= len(out):
                out += out[ref:end]
            else:  # overlapping copy: the pattern repeats
                pat = out[ref:]
                out += (pat * (length // len(pat) + 1))[:length]
    except IndexError:
        raise ValueError("truncated LZF data") from None
    if len(out) != expected:
        raise ValueError(f"LZF data decompresses to {len(out)} bytes, header says {expected}")
    return bytes(out)


def lzf_compress(src: bytes) -> bytes:
    """A simple, correct LZF compressor (greedy; the decoder is any liblzf-compatible one).

    Candidate matches are found vectorized: each position's previous occurrence of the same
    3 bytes (exact keys, no hash collisions) within LZF's 8 KiB window. The Python loop then
    steps once per emitted token (a match, or a literal run of up to 32 bytes).
    """
    a = np.frombuffer(src, np.uint8)
    n = len(a)
    out = bytearray()
    if n == 0:
        return bytes(out)
    prev = np.full(n, -1, np.int64)
    if n >= 3:
        key = (a[:-2].astype(np.int32) << 16) | (a[1:-1].astype(np.int32) << 8) | a[2:]
        order = np.argsort(key, kind="stable")
        same = key[order[1:]] == key[order[:-1]]
        prev[order[1:][same]] = order[:-1][same]
    pos = np.arange(n)
    ok = (prev >= 0) & (pos - prev <= 8192)
    match_at = np.flatnonzero(ok).tolist()
    prev_at = prev[ok].tolist()
    mptr = 0
    p = 0
    lit_start = 0

    def flush_literals(start: int, stop: int) -> None:
        for s in range(start, stop, 32):
            e = min(s + 32, stop)
            out.append(e - s - 1)
            out.extend(src[s:e])

    while p < n:
        # jump to the next position that has a candidate match
        if mptr < len(match_at) and match_at[mptr] < p:
            mptr = bisect.bisect_left(match_at, p, mptr)
        if mptr == len(match_at):
            break
        p = match_at[mptr]
        ref = prev_at[mptr]
        lim = min(264, n - p)
        if lim < 3:
            break
        length = 3
        if src[ref : ref + 16] == src[p : p + 16] and lim > 16:  # long match: compare vectorized
            eq = a[ref : ref + lim] == a[p : p + lim]
            length = lim if eq.all() else int(np.argmin(eq))
        else:
            while length < lim and src[ref + length] == src[p + length]:
                length += 1
        if length < 3:  # cannot happen with exact keys, but stay safe
            p += 1
            continue
        flush_literals(lit_start, p)
        off = p - ref - 1
        ln = length - 2
        if ln < 7:
            out.append((ln << 5) | (off >> 8))
        else:
            out.append((7 << 5) | (off >> 8))
            out.append(ln - 7)
        out.append(off & 0xFF)
        p += length
        lit_start = p
    flush_literals(lit_start, n)
    return bytes(out)


# --------------------------------------------------------------------------- reading
def _source(path_or_bytes, where: str | None) -> tuple[bytes | memoryview, str]:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return memoryview(path_or_bytes), where or "<bytes>"
    path = Path(path_or_bytes)
    where = where or str(path)
    try:
        return path.read_bytes(), where
    except OSError as e:
        raise FrameError(where, f"cannot read: {e.strerror or e}") from None


def _record_dtype(h: PCDHeader) -> np.dtype:
    """Array-of-structs record; padding fields are left out by offsets."""
    names, formats, offsets = [], [], []
    off = 0
    for k, f in enumerate(h.fields):
        if f != "_" and h.counts[k] > 0:
            names.append(f)
            c = h.counts[k]
            formats.append(h.numpy_type(k) if c == 1 else (h.numpy_type(k), (c,)))
            offsets.append(off)
        off += h.sizes[k] * h.counts[k]
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": max(off, 1)}
    )


def _columns_dtype(h: PCDHeader) -> np.dtype:
    """Struct-of-arrays layout of binary_compressed: one record holding every field's block."""
    names, formats, offsets = [], [], []
    off = 0
    n = h.points
    for k, f in enumerate(h.fields):
        c = h.counts[k]
        if f != "_" and c > 0:
            names.append(f)
            formats.append((h.numpy_type(k), (n,) if c == 1 else (n, c)))
            offsets.append(off)
        off += h.sizes[k] * c * n
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": max(off, 1)}
    )


def _trailing(where: str, what: str) -> None:
    warnings.warn(PCDWarning(f"{where}: {what} after the last point ignored", "trailing bytes"),
                  stacklevel=3)  # fmt: skip


def _read_ascii(h: PCDHeader, body: bytes, where: str) -> dict[str, np.ndarray]:
    tokens = body.split()
    per_point = sum(h.counts)
    if len(tokens) > h.points * per_point:
        # extra lines after the WIDTH × HEIGHT points are trailing bytes, not a size mismatch
        lines = [ln for ln in body.splitlines() if ln.strip()]
        head = [ln.split() for ln in lines[: h.points]]
        if len(head) == h.points and all(len(t) == per_point for t in head):
            tokens = [t for row in head for t in row]
            _trailing(where, f"{len(lines) - h.points} lines")
    if len(tokens) < h.points * per_point:
        raise FrameError(
            where,
            f"truncated ascii data: {len(tokens)} values for {h.points} points × {per_point}",
        )
    if len(tokens) > h.points * per_point:
        raise FrameError(
            where,
            f"size mismatch: {len(tokens)} ascii values for {h.points} points × {per_point}",
        )
    table = np.array(tokens, dtype=np.bytes_).reshape(h.points, per_point)
    out: dict[str, np.ndarray] = {}
    col = 0
    for k, f in enumerate(h.fields):
        c = h.counts[k]
        if f != "_" and c > 0:
            t = h.numpy_type(k)
            block = table[:, col : col + c]
            try:
                if t.kind == "f":
                    vals = block.astype(np.float64).astype(t)
                else:
                    vals = block.astype(np.int64 if t.kind == "i" else np.uint64).astype(t)
            except (ValueError, OverflowError):
                raise FrameError(where, f"bad ascii value in field {f!r}") from None
            out[f] = vals[:, 0].copy() if c == 1 else np.ascontiguousarray(vals)
        col += c
    return out


def read_pcd(path_or_bytes, where: str | None = None) -> dict[str, np.ndarray]:
    """Read a PCD v0.7 file (a path, or the file's bytes) → ``{field name: array}``.

    Arrays have the header's type; ``COUNT`` 1 gives shape (N,), ``COUNT`` c > 1 gives (N, c).
    Padding fields ``_`` and COUNT-0 fields are dropped; bytes after the last point are ignored
    with a :class:`PCDWarning` (kind ``"trailing bytes"``). NaN/inf values are returned as they
    are (see :func:`points_xyzi`). ``where`` names the source in error messages (default: the path).
    Raises :class:`FrameError` for a truncated file, a bad header or a size mismatch.
    """
    data, where = _source(path_or_bytes, where)
    h, start = parse_header(data, where)
    body = data[start:]
    if h.data == "ascii":
        return _read_ascii(h, bytes(body), where)
    if h.data == "binary":
        need = h.points * h.point_size
        if len(body) < need:
            raise FrameError(
                where,
                f"truncated binary data: {len(body)} bytes for {h.points} points "
                f"× {h.point_size} bytes",
            )
        if len(body) > need:
            _trailing(where, f"{len(body) - need} bytes")
        rec = np.frombuffer(body, dtype=_record_dtype(h), count=h.points)
        return {f: np.ascontiguousarray(rec[f]) for f in rec.dtype.names}
    # binary_compressed
    if len(body) < 8:
        raise FrameError(where, "truncated binary_compressed data: no size words")
    csize, usize = struct.unpack_from("<II", body, 0)
    need = h.points * h.point_size
    if usize != need:
        raise FrameError(
            where,
            f"size mismatch: uncompressed size {usize} ≠ {h.points} points × {h.point_size} bytes",
        )
    if len(body) < 8 + csize:
        raise FrameError(
            where,
            f"truncated binary_compressed data: {len(body) - 8} of {csize} bytes",
        )
    if len(body) > 8 + csize:
        _trailing(where, f"{len(body) - 8 - csize} bytes")
    if need == 0:
        raw = b""
    else:
        try:
            raw = lzf_decompress(bytes(body[8 : 8 + csize]), usize)
        except ValueError as e:
            raise FrameError(where, f"corrupt LZF data: {e}") from None
    if h.points == 0:
        return {
            h.fields[k]: np.zeros((0,) if h.counts[k] == 1 else (0, h.counts[k]), h.numpy_type(k))
            for k in h.named()
        }
    rec = np.frombuffer(raw, dtype=_columns_dtype(h), count=1)[0]
    return {f: np.ascontiguousarray(rec[f]) for f in rec.dtype.names}


# --------------------------------------------------------------------------- points
def _finite(points: np.ndarray, where: str, return_dropped: bool, allow_empty: bool = False):
    keep = np.isfinite(points).all(axis=1)
    dropped = int(len(points) - keep.sum())
    if dropped:
        points = points[keep]
        if not return_dropped:
            msg = f"{where}: dropped {dropped} NaN/inf points"
            warnings.warn(PCDWarning(msg, "NaN/inf points"), stacklevel=3)
    if len(points) == 0 and not allow_empty:
        reason = "empty scan" if not dropped else f"empty scan (all {dropped} points NaN/inf)"
        raise FrameError(where, reason)
    return (points, dropped) if return_dropped else points


def _column(fields: dict[str, np.ndarray], name: str) -> np.ndarray:
    v = fields[name]
    return v if v.ndim == 1 else v[:, 0]


def _xyz(fields: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
    lower = {k.lower(): k for k in fields}
    missing = [c for c in "xyz" if c not in lower]
    if missing:
        raise FrameError(where, f"PCD has no {'/'.join(missing)} field (fields: "
                         f"{' '.join(fields) or 'none'})")  # fmt: skip
    return [_column(fields, lower[c]) for c in "xyz"]


def points_xyzi(fields: dict[str, np.ndarray], where: str = "<pcd>", *,
                return_dropped: bool = False):  # fmt: skip
    """LiDAR fields → float32 (N, 4) x, y, z, intensity in the sensor frame.

    Intensity is looked up as ``intensity`` (or ``reflectivity``/``i``/``remission``). A PCD
    without an intensity field gets intensity 0: PCL's own convention for clouds whose point
    type carries no intensity (``pcl::PointXYZ``), a documented default of the raw format —
    not invented data. Points with any NaN/inf coordinate or intensity are dropped: with a
    :class:`PCDWarning` naming the count, or returned as ``(points, n_dropped)`` when
    ``return_dropped``. No finite point left → ``FrameError(where, "empty scan")``.
    """
    x, y, z = _xyz(fields, where)
    lower = {k.lower(): k for k in fields}
    name = next((lower[c] for c in INTENSITY_NAMES if c in lower), None)
    inten = _column(fields, name) if name else np.zeros(len(x), np.float32)
    pts = np.stack([x, y, z, inten], axis=1).astype(np.float32, copy=False)
    return _finite(pts, where, return_dropped)


def radar_points(fields: dict[str, np.ndarray], where: str = "<pcd>", *,
                 return_dropped: bool = False, allow_empty: bool = False):  # fmt: skip
    """Radar fields → float32 (N, 4) x, y, z, Doppler (radial) velocity in m/s.

    The velocity field is the first present (case-insensitive) of
    :data:`RADAR_VELOCITY_NAMES` (``velocity``, ``doppler``, ``v_r``, ``vr``, ``v``,
    ``radial_velocity``, ``vx_comp``, …); none → :class:`FrameError`. NaN/inf handling and the
    empty-scan rule as in :func:`points_xyzi` (``allow_empty`` lets a 0-target scan through).
    """
    x, y, z = _xyz(fields, where)
    lower = {k.lower(): k for k in fields}
    name = next((lower[c] for c in RADAR_VELOCITY_NAMES if c in lower), None)
    if name is None:
        raise FrameError(where, f"radar PCD has no velocity field (fields: {' '.join(fields)})")
    pts = np.stack([x, y, z, _column(fields, name)], axis=1).astype(np.float32, copy=False)
    return _finite(pts, where, return_dropped, allow_empty)


# --------------------------------------------------------------------------- writing
def _pcd_type(name: str, a: np.ndarray) -> tuple[str, int]:
    k = a.dtype.kind
    if k == "b":
        return "U", 1
    if k in "fiu" and (_NUMPY_KIND_INV[k], a.dtype.itemsize) in _TYPES:
        return _NUMPY_KIND_INV[k], a.dtype.itemsize
    raise ValueError(f"write_pcd: field {name!r} has unsupported dtype {a.dtype}")


_NUMPY_KIND_INV = {"f": "F", "i": "I", "u": "U"}


def write_pcd(path: str | PathLike, fields: dict[str, np.ndarray], encoding: str = "binary",
              viewpoint=(0, 0, 0, 1, 0, 0, 0)) -> None:  # fmt: skip
    """Write a valid PCD v0.7 file: fields in dict order, (N,) or (N, count) arrays each.

    ``encoding``: ``binary`` (default), ``ascii`` or ``binary_compressed`` (LZF). Types follow
    the arrays' dtypes (bool → U1). WIDTH = POINTS = N, HEIGHT = 1 (unorganized). The file is
    written in one go (no half-written file is left behind on a bad argument).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"write_pcd: encoding must be one of {ENCODINGS}, not {encoding!r}")
    if not fields:
        raise ValueError("write_pcd: no fields")
    cols: dict[str, np.ndarray] = {}
    n = None
    for name, v in fields.items():
        if not name or any(ch.isspace() for ch in name):
            raise ValueError(f"write_pcd: bad field name {name!r}")
        a = np.asarray(v)
        if a.dtype.kind == "b":
            a = a.astype(np.uint8)
        if a.ndim not in (1, 2):
            raise ValueError(f"write_pcd: field {name!r} must be (N,) or (N, count)")
        if n is None:
            n = len(a)
        elif len(a) != n:
            raise ValueError(f"write_pcd: field {name!r} has {len(a)} points, expected {n}")
        _pcd_type(name, a)
        cols[name] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    assert n is not None
    types = [_pcd_type(k, a) for k, a in cols.items()]
    counts = [1 if a.ndim == 1 else a.shape[1] for a in cols.values()]
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\n"
        "VERSION 0.7\n"
        f"FIELDS {' '.join(cols)}\n"
        f"SIZE {' '.join(str(s) for _, s in types)}\n"
        f"TYPE {' '.join(t for t, _ in types)}\n"
        f"COUNT {' '.join(str(c) for c in counts)}\n"
        f"WIDTH {n}\nHEIGHT 1\n"
        f"VIEWPOINT {' '.join(repr(float(v)) if v % 1 else str(int(v)) for v in viewpoint)}\n"
        f"POINTS {n}\n"
        f"DATA {encoding}\n"
    ).encode("ascii")
    if encoding == "binary":
        dt = np.dtype([(k, a.dtype, a.shape[1:]) for k, a in cols.items()])
        rec = np.empty(n, dt)
        for k, a in cols.items():
            rec[k] = a
        body = rec.tobytes()
    elif encoding == "binary_compressed":
        raw = b"".join(np.ascontiguousarray(a).tobytes() for a in cols.values())
        comp = lzf_compress(raw)
        body = struct.pack("<II", len(comp), len(raw)) + comp
    else:
        table = np.empty((n, sum(counts)), object)  # per column: no float promotion of ints
        j = 0
        for a, c in zip(cols.values(), counts, strict=True):
            table[:, j : j + c] = a.reshape(n, c).astype(object)
            j += c
        fmts = []
        for a, c in zip(cols.values(), counts, strict=True):
            f = "%.17g" if a.dtype.itemsize == 8 else "%.9g"
            fmts += [f if a.dtype.kind == "f" else "%d"] * c
        buf = io.StringIO()
        if n:
            np.savetxt(buf, table, fmt=fmts, delimiter=" ")
        body = buf.getvalue().encode("ascii")
    Path(path).write_bytes(header + body)
