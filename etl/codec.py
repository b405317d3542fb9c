"""The record codec: one sample ↔ bytes. Versioned, self-describing, no pickle.

Layout of one record::

    b"RFS1" | u32 header length | header (UTF-8 JSON) | array bytes, concatenated

The header holds ``{"v": CODEC_VERSION, "schema": SCHEMA_VERSION, "meta": {...},
"arrays": [[key, dtype, shape, offset, nbytes], ...]}``. Absent modalities are not stored;
decoding fills their placeholders from the contract so every decoded sample has one shape.
Image-like arrays are stored in ``storage_dtype`` (float16 by default) and decoded to float32.

Decoding writes each stored array straight into its destination, cast on the way (one pass
over the bytes, no intermediate array): :func:`decode_into` fills row ``i`` of a batch's
arrays — how the Grain reader assembles batches without a copy — and :func:`decode` fills
fresh arrays of one sample. float16 → float32 goes through OpenCV's vectorized conversion
(≈6× faster than numpy's scalar loop; exact, as every float16 is a float32 — bit-identical to
``ndarray.astype`` for every non-NaN value, NaN stays NaN: tests/test_data.py).
"""

from __future__ import annotations

import functools
import json
import struct
from typing import Any

import numpy as np

from etl.config import PreprocessConfig
from etl.schema import IMAGE_MODALITIES, MODALITIES, SCHEMA_VERSION, empty_sample, sample_spec

MAGIC = b"RFS1"
CODEC_VERSION = 1
_ALLOWED_DTYPES = {
    "float16",
    "float32",
    "float64",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "bool",
}


class CodecError(ValueError):
    pass


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a.astype(dtype)``; float32 → float16 through OpenCV's vectorized conversion (≈7×
    faster than numpy's scalar loop, and bit-identical: round-to-nearest-even, signed zeros,
    subnormals, overflow to inf — see tests/test_etl_speed_equivalence.py)."""
    if a.dtype == np.float32 and np.dtype(dtype) == np.float16 and a.size:
        try:
            import cv2
        except ImportError:  # pragma: no cover — opencv is a core dependency
            return a.astype(dtype)
        flat = np.ascontiguousarray(a).reshape(-1, 1)
        return cv2.subtract(flat, 0.0, dtype=cv2.CV_16F).reshape(a.shape)  # x − 0 keeps −0
    return a.astype(dtype)


def encode(
    sample: dict[str, np.ndarray],
    meta: dict[str, Any] | None = None,
    storage_dtype: str = "float16",
) -> bytes:
    """Serialize a sample (contract keys) plus JSON-able ``meta`` (drive, frame, …)."""
    present = np.asarray(sample["present"])
    entries, chunks, offset = [], [], 0
    for key, value in sample.items():
        if key in MODALITIES and not present[MODALITIES.index(key)]:
            continue  # absent: not stored, flagged by `present`
        a = np.asarray(value)
        if key in IMAGE_MODALITIES:
            a = _cast(a, storage_dtype)
        a = np.asarray(a, order="C")  # keeps 0-d scalars 0-d (ascontiguousarray would not)
        if a.dtype.name not in _ALLOWED_DTYPES:
            raise CodecError(f"{key}: dtype {a.dtype} cannot be stored")
        entries.append([key, a.dtype.name, list(a.shape), offset, a.nbytes])
        chunks.append(a.reshape(-1).view(np.uint8))  # C-contiguous: joined without a copy
        offset += a.nbytes
    header = json.dumps(
        {"v": CODEC_VERSION, "schema": SCHEMA_VERSION, "meta": meta or {}, "arrays": entries},
        separators=(",", ":"),
    ).encode()
    # one copy of every array, straight into the record (no per-array tobytes)
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *chunks])


def decode_header(record: bytes) -> dict[str, Any]:
    if len(record) < 8 or record[:4] != MAGIC:
        raise CodecError("not a raceformer record (bad magic)")
    (n,) = struct.unpack_from("<I", record, 4)
    if 8 + n > len(record):
        raise CodecError("truncated record header")
    header = json.loads(record[8 : 8 + n])
    if header.get("v") != CODEC_VERSION:
        raise CodecError(f"codec version {header.get('v')} is not {CODEC_VERSION}")
    if header.get("schema") != SCHEMA_VERSION:
        raise CodecError(f"schema version {header.get('schema')} is not {SCHEMA_VERSION}")
    return header


def _header_and_body(record: bytes) -> tuple[dict[str, Any], memoryview]:
    header = decode_header(record)
    base = 8 + struct.unpack_from("<I", record, 4)[0]
    return header, memoryview(record)[base:]


def _stored(body: memoryview, key: str, dtype: str, shape, offset: int, nbytes: int):
    """The stored array ``key``: a read-only view of the record's bytes (no copy)."""
    if dtype not in _ALLOWED_DTYPES:
        raise CodecError(f"{key}: stored dtype {dtype!r} is not one the codec writes")
    if offset < 0 or offset + nbytes > len(body):
        raise CodecError(f"truncated record: {key} runs past the end")
    try:
        return np.frombuffer(body[offset : offset + nbytes], dtype=dtype).reshape(shape)
    except ValueError as e:
        raise CodecError(f"{key}: {nbytes} bytes do not hold {dtype} {shape}: {e}") from None


_CV2 = None


def _cv2():
    global _CV2
    if _CV2 is None:
        import cv2

        _CV2 = cv2
    return _CV2


def _copy_cast(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src.astype(dst.dtype)`` in one pass; float16 → float32 through OpenCV."""
    if src.dtype == np.float16 and dst.dtype == np.float32 and src.size and dst.flags.c_contiguous:
        cv2 = _cv2()
        flat = dst.reshape(-1, 1)  # a view (contiguous): OpenCV writes the batch row itself
        got = cv2.subtract(src.reshape(-1, 1), 0.0, dst=flat, dtype=cv2.CV_32F)  # x − 0 keeps −0
        if got.ctypes.data != flat.ctypes.data:  # never seen; a silent copy would lose the data
            raise RuntimeError("OpenCV did not write float16 → float32 into the given array")
    else:
        np.copyto(dst, src, casting="unsafe")  # what ndarray.astype does


@functools.lru_cache(maxsize=8)
def _contract(cfg: PreprocessConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(sample_spec, empty_sample) of ``cfg``, built once (read-only: never hand these out)."""
    empty = empty_sample(cfg)
    for a in empty.values():
        a.flags.writeable = False
    return sample_spec(cfg), empty


def decode_into(
    record: bytes, out: dict[str, np.ndarray], index: int, cfg: PreprocessConfig
) -> dict[str, Any]:
    """Decode ``record`` into row ``index`` of the batch arrays ``out`` (key → array of shape
    ``(batch, *contract shape)``, any subset of the contract's keys, any dtype); returns meta.

    Each stored array is cast straight into ``out[key][index]``; keys the record does not store
    (absent modalities) get the contract's placeholder, exactly as :func:`decode` gives them.
    """
    header, body = _header_and_body(record)
    spec, empty = _contract(cfg)
    stored = {e[0]: e for e in header["arrays"]}
    for key, batch in out.items():
        if key not in spec:
            raise CodecError(f"{key}: not a key of the sample contract")
        dst = batch[index, ...]  # a view of the row (0-d arrays stay arrays)
        entry = stored.get(key)
        if entry is None:
            np.copyto(dst, empty[key], casting="unsafe")
            continue
        _, dtype, shape, offset, nbytes = entry
        if tuple(shape) != spec[key].shape:
            raise CodecError(f"{key}: stored shape {tuple(shape)} ≠ config {spec[key].shape}")
        _copy_cast(_stored(body, key, dtype, shape, offset, nbytes), dst)
    return header["meta"]


def decode(record: bytes, cfg: PreprocessConfig | None = None) -> dict[str, Any]:
    """Bytes → sample dict of numpy arrays (float32 images) plus ``meta``.

    With ``cfg`` the result is completed to the full contract (placeholders for absent
    modalities, dtypes as in :func:`etl.schema.sample_spec`); without it only stored arrays.
    """
    header, body = _header_and_body(record)
    stored = {e[0] for e in header["arrays"]}
    spec, empty = _contract(cfg) if cfg is not None else ({}, {})
    out: dict[str, Any] = {  # the contract's keys in its order; placeholders where not stored
        k: np.empty(s.shape, s.dtype) if k in stored else empty[k].copy() for k, s in spec.items()
    }
    for key, dtype, shape, offset, nbytes in header["arrays"]:
        a = _stored(body, key, dtype, shape, offset, nbytes)
        if key in spec:
            if tuple(shape) != spec[key].shape:
                raise CodecError(f"{key}: stored shape {tuple(shape)} ≠ config {spec[key].shape}")
        else:
            out[key] = np.empty(a.shape, np.float32 if key in IMAGE_MODALITIES else a.dtype)
        _copy_cast(a, out[key])
    out["meta"] = header["meta"]
    return out
