"""PCD v0.7 reader/writer: all encodings, odd headers, LZF, and bad input as FrameError."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest

from etl.errors import FrameError
from etl.pcd import (
    PCDWarning,
    lzf_compress,
    lzf_decompress,
    parse_header,
    points_xyzi,
    radar_points,
    read_pcd,
    write_pcd,
)

ENCODINGS = ["ascii", "binary", "binary_compressed"]


def _cloud(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(0, 20, n).astype(np.float32),
        "y": rng.normal(0, 20, n).astype(np.float32),
        "z": rng.normal(0, 2, n).astype(np.float32),
        "intensity": rng.integers(0, 256, n).astype(np.float32),
        "ring": rng.integers(0, 32, n).astype(np.uint16),
        "time": np.sort(rng.uniform(0, 0.1, n)),  # float64
        "label": rng.integers(-5, 5, n).astype(np.int8),
        "normal": rng.normal(size=(n, 3)).astype(np.float32),  # COUNT 3
        "big": rng.integers(0, 2**62, n).astype(np.uint64),
    }


@pytest.mark.parametrize("enc", ENCODINGS)
def test_round_trip_all_encodings(tmp_path, enc):
    f = _cloud()
    p = tmp_path / f"c_{enc}.pcd"
    write_pcd(p, f, encoding=enc)
    h, _ = parse_header(p.read_bytes())
    assert h.data == enc and h.points == 500 and h.width == 500 and h.height == 1
    assert h.counts[list(h.fields).index("normal")] == 3
    g = read_pcd(p)
    assert list(g) == list(f)
    for k, v in f.items():
        assert g[k].dtype == v.dtype, k
        assert g[k].shape == v.shape, k
        np.testing.assert_array_equal(g[k], v, err_msg=k)
    # bytes in, same result
    g2 = read_pcd(p.read_bytes(), where="mem")
    np.testing.assert_array_equal(g2["normal"], f["normal"])


@pytest.mark.parametrize("enc", ENCODINGS)
def test_shuffled_field_order_found_by_name(tmp_path, enc):
    f = _cloud(50)
    shuffled = {k: f[k] for k in ["ring", "intensity", "z", "time", "y", "x"]}
    p = tmp_path / "s.pcd"
    write_pcd(p, shuffled, encoding=enc)
    pts = points_xyzi(read_pcd(p))
    assert pts.dtype == np.float32 and pts.shape == (50, 4)
    want = np.stack([f["x"], f["y"], f["z"], f["intensity"]], 1)
    np.testing.assert_array_equal(pts, want)


@pytest.mark.parametrize("enc", ENCODINGS)
def test_empty_cloud_reads_but_is_an_empty_scan(tmp_path, enc):
    p = tmp_path / "e.pcd"
    write_pcd(p, {"x": np.zeros(0, np.float32), "y": np.zeros(0, np.float32),
                  "z": np.zeros(0, np.float32)}, encoding=enc)  # fmt: skip
    g = read_pcd(p)
    assert g["x"].shape == (0,)
    with pytest.raises(FrameError, match="empty scan") as e:
        points_xyzi(g, str(p))
    assert str(p) in str(e.value)


def _header(fields, sizes, types, counts, n, data):
    return (
        f"VERSION .7\nFIELDS {fields}\nSIZE {sizes}\nTYPE {types}\nCOUNT {counts}\n"
        f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n"
    ).encode()


def test_padding_fields_binary_and_compressed(tmp_path):
    n = 7
    dt = np.dtype([("x", "<f4"), ("p1", "V3"), ("y", "<f4"), ("z", "<f4"), ("p2", "V4"),
                   ("rgb", "u1", (3,))])  # fmt: skip
    rec = np.zeros(n, dt)
    rec["x"], rec["y"], rec["z"] = np.arange(n), np.arange(n) * 2, np.arange(n) * 3
    rec["rgb"] = np.arange(3 * n).reshape(n, 3)
    raw = rec.tobytes()
    hdr = _header("x _ y z _ rgb", "4 1 4 4 4 1", "F U F F F U", "1 3 1 1 1 3", n, "binary")
    p = tmp_path / "pad.pcd"
    p.write_bytes(hdr + raw)
    g = read_pcd(p)
    assert list(g) == ["x", "y", "z", "rgb"]
    np.testing.assert_array_equal(g["y"], np.arange(n) * 2)
    np.testing.assert_array_equal(g["rgb"], np.arange(3 * n).reshape(n, 3))
    # the same in struct-of-arrays layout, LZF-compressed
    soa = b"".join([
        rec["x"].tobytes(), b"\x00" * 3 * n, rec["y"].tobytes(), rec["z"].tobytes(),
        b"\x00" * 4 * n, np.ascontiguousarray(rec["rgb"]).tobytes(),
    ])  # fmt: skip
    comp = lzf_compress(soa)
    hdr_c = hdr.replace(b"DATA binary", b"DATA binary_compressed")
    p.write_bytes(hdr_c + struct.pack("<II", len(comp), len(soa)) + comp)
    g = read_pcd(p)
    np.testing.assert_array_equal(g["z"], np.arange(n) * 3)
    np.testing.assert_array_equal(g["rgb"], np.arange(3 * n).reshape(n, 3))


def test_hand_written_ascii(tmp_path):
    text = b"""# .PCD v0.7 - Point Cloud Data file format
# a comment line
VERSION 0.7
FIELDS x y z intensity ring _
SIZE 4 4 4 4 2 4
TYPE F F F F U F
WIDTH 2
HEIGHT 2
VIEWPOINT 0 0 0 1 0 0 0
POINTS 4
DATA ascii
1.5 2 3 10 0 9
-1 -2 -3 20 1 9
nan 0 0 5 2 9
4 5 6 7 31 9
"""
    p = tmp_path / "hand.pcd"
    p.write_bytes(text)
    g = read_pcd(p)
    assert list(g) == ["x", "y", "z", "intensity", "ring"]
    assert g["ring"].dtype == np.uint16 and g["ring"].tolist() == [0, 1, 2, 31]
    with pytest.warns(PCDWarning, match="dropped 1 NaN/inf"):
        pts = points_xyzi(g, str(p))
    np.testing.assert_array_equal(pts[:, 3], [10, 20, 7])
    pts, dropped = points_xyzi(g, str(p), return_dropped=True)
    assert dropped == 1 and pts.shape == (3, 4)


def test_nan_inf_points_dropped_not_crashing(tmp_path):
    f = _cloud(20)
    f["x"][3] = np.nan
    f["z"][5] = np.inf
    p = tmp_path / "nan.pcd"
    write_pcd(p, f, "binary")
    with pytest.warns(PCDWarning, match="dropped 2"):
        pts = points_xyzi(read_pcd(p), str(p))
    assert pts.shape == (18, 4) and np.isfinite(pts).all()
    for k in "xyz":
        f[k][:] = np.nan
    write_pcd(p, f, "binary")
    with pytest.raises(FrameError, match="empty scan"):
        points_xyzi(read_pcd(p), str(p), return_dropped=True)


def test_intensity_defaults_to_zero_and_radar_velocity_names():
    xyz = {k: np.arange(3, dtype=np.float32) for k in "xyz"}
    pts = points_xyzi(xyz)
    np.testing.assert_array_equal(pts[:, 3], 0)
    for name in ["velocity", "v", "doppler", "v_r", "vr", "radial_velocity", "vx_comp", "VR"]:
        r = radar_points({**xyz, "rcs": np.ones(3, np.float32), name: np.full(3, -4.5)})
        assert r.dtype == np.float32 and r.shape == (3, 4)
        np.testing.assert_array_equal(r[:, 3], -4.5)
    with pytest.raises(FrameError, match="no velocity field"):
        radar_points({**xyz, "rcs": np.ones(3)}, "radar.pcd")
    with pytest.raises(FrameError, match="no x field"):
        points_xyzi({"y": np.ones(2), "z": np.ones(2)}, "f.pcd")
    assert radar_points({**xyz, "v": np.full(3, np.nan)}, allow_empty=True,
                        return_dropped=True)[1] == 3  # fmt: skip


def test_lzf_known_stream_and_round_trips():
    # literal "abc", then a 6-byte back-reference 3 bytes back (overlapping copy)
    stream = bytes([2]) + b"abc" + bytes([(4 << 5) | 0, 2])
    assert lzf_decompress(stream, 9) == b"abcabcabc"
    # long match with the extra length byte: 3 + 100 bytes of "a"
    stream = bytes([0]) + b"a" + bytes([(7 << 5) | 0, 100 - 2 - 7, 0])
    assert lzf_decompress(stream, 101) == b"a" * 101
    rng = np.random.default_rng(1)
    cases = [
        b"",
        b"a",
        b"ab",
        bytes(10000),
        rng.integers(0, 256, 5000).astype(np.uint8).tobytes(),
        (b"hello world " * 900) + rng.integers(0, 4, 3000).astype(np.uint8).tobytes(),
        np.repeat(rng.integers(0, 256, 400), 37).astype(np.uint8).tobytes(),
    ]
    for c in cases:
        z = lzf_compress(c)
        assert lzf_decompress(z, len(c)) == c
    assert len(lzf_compress(bytes(10000))) < 200
    with pytest.raises(ValueError):
        lzf_decompress(bytes([(1 << 5) | 0, 5]), 3)  # reference before the start
    with pytest.raises(ValueError):
        lzf_decompress(bytes([10]) + b"abc", 11)  # literal run cut short
    with pytest.raises(ValueError):
        lzf_decompress(bytes([2]) + b"abc", 4)  # wrong size


@pytest.mark.parametrize("enc", ENCODINGS)
def test_truncated_files_name_the_file(tmp_path, enc):
    p = tmp_path / f"t_{enc}.pcd"
    write_pcd(p, _cloud(300), encoding=enc)
    data = p.read_bytes()
    q = tmp_path / "cut.pcd"
    q.write_bytes(data[: len(data) - 100])
    with pytest.raises(FrameError) as e:
        read_pcd(q)
    msg = str(e.value)
    assert msg.startswith(str(q) + ": ") and "\n" not in msg
    assert "truncated" in msg or "corrupt" in msg


def test_bad_headers_and_corrupt_data(tmp_path):
    def err(data: bytes) -> str:
        p = tmp_path / "bad.pcd"
        p.write_bytes(data)
        with pytest.raises(FrameError) as e:
            read_pcd(p)
        assert str(e.value).startswith(str(p) + ": ")
        return e.value.reason

    assert "empty file" in err(b"")
    assert "no DATA" in err(b"VERSION 0.7\nFIELDS x\n")
    assert "no DATA" in err(bytes(range(256)) * 4)
    assert "SIZE entries" in err(_header("x y", "4", "F F", "1 1", 1, "binary") + bytes(8))
    assert "TYPE Q" in err(_header("x", "4", "Q", "1", 1, "binary") + bytes(4))
    assert "F SIZE 3" in err(_header("x", "3", "F", "1", 1, "binary") + bytes(3))
    assert "unknown DATA" in err(_header("x", "4", "F", "1", 1, "zip") + bytes(4))
    assert "duplicate" in err(_header("x x", "4 4", "F F", "1 1", 1, "binary") + bytes(8))
    assert "POINTS" in err(
        b"FIELDS x\nSIZE 4\nTYPE F\nWIDTH 3\nHEIGHT 1\nPOINTS 2\nDATA binary\n" + bytes(8)
    )
    assert "truncated ascii" in err(_header("x y", "4 4", "F F", "1 1", 2, "ascii") + b"1 2\n3")
    assert "size mismatch" in err(_header("x", "4", "F", "1", 1, "ascii") + b"1 2 3\n")
    assert "bad ascii value" in err(_header("x", "4", "I", "1", 1, "ascii") + b"abc\n")
    hdr = _header("x", "4", "F", "1", 4, "binary_compressed")
    assert "size mismatch" in err(hdr + struct.pack("<II", 4, 99) + bytes(4))
    assert "corrupt LZF" in err(hdr + struct.pack("<II", 2, 16) + bytes([0xFF, 0xFF]))
    assert "no size words" in err(hdr + b"\x01")
    with pytest.raises(FrameError, match="cannot read"):
        read_pcd(tmp_path / "missing.pcd")


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="points"):
        write_pcd(tmp_path / "a.pcd", {"x": np.zeros(3), "y": np.zeros(4)})
    with pytest.raises(ValueError, match="encoding"):
        write_pcd(tmp_path / "a.pcd", {"x": np.zeros(3)}, encoding="lz4")
    with pytest.raises(ValueError, match="dtype"):
        write_pcd(tmp_path / "a.pcd", {"x": np.zeros(3, complex)})


def test_32_beam_cloud_reads_whole(tmp_path):
    """A 30k-point Velodyne-like cloud (x y z intensity ring): every encoding decodes every
    point, without a warning, to the values written. (How fast: benchmarks/etl.py, which
    reads the PCDs of whole drives; a timed assertion here failed on a loaded CI machine.)"""
    n = 30000
    rng = np.random.default_rng(2)
    f = {k: rng.normal(0, 10, n).astype(np.float32) for k in ("x", "y", "z", "intensity")}
    f["ring"] = rng.integers(0, 32, n).astype(np.uint16)
    want = np.stack([f[k] for k in ("x", "y", "z", "intensity")], axis=1)
    for enc in ENCODINGS:
        p = tmp_path / f"v_{enc}.pcd"
        write_pcd(p, f, enc)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pts = points_xyzi(read_pcd(p))
        assert pts.shape == (n, 4), enc
        np.testing.assert_allclose(pts, want, rtol=1e-6, atol=1e-6, err_msg=enc)


# PCL's own padding: `_` with COUNT 0 (no bytes) beside `_` with COUNT 12 (12 bytes)
_PCL = ("x y z _ intensity _", "4 4 4 1 4 1", "F F F U F U", "1 1 1 0 1 12")


def _pcl_file(enc: str, n: int = 9, trailing: bytes = b"") -> tuple[bytes, np.ndarray]:
    xyzi = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
    hdr = _header(*_PCL, n, enc)
    if enc == "binary":
        rec = np.zeros(n, [("xyz", "<f4", (3,)), ("i", "<f4"), ("pad", "u1", (12,))])
        rec["xyz"], rec["i"], rec["pad"] = xyzi[:, :3], xyzi[:, 3], 0xAB
        body = rec.tobytes()
        assert len(body) == n * 28
    elif enc == "ascii":
        body = b"".join(b" ".join(b"%g" % v for v in row) + b" 0" * 12 + b"\n" for row in xyzi)
    else:
        soa = b"".join([xyzi[:, 0].tobytes(), xyzi[:, 1].tobytes(), xyzi[:, 2].tobytes(),
                        xyzi[:, 3].tobytes(), b"\xab" * 12 * n])  # fmt: skip
        comp = lzf_compress(soa)
        body = struct.pack("<II", len(comp), len(soa)) + comp
    return hdr + body + trailing, xyzi


@pytest.mark.parametrize("enc", ENCODINGS)
def test_pcl_count_zero_padding_reads(tmp_path, enc):
    data, xyzi = _pcl_file(enc)
    h, _ = parse_header(data)
    assert h.point_size == 28
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no trailing-bytes notice on an exact file
        g = read_pcd(data, where="pcl.pcd")
    assert list(g) == ["x", "y", "z", "intensity"]
    np.testing.assert_array_equal(points_xyzi(g), xyzi)


@pytest.mark.parametrize("enc", ENCODINGS)
def test_pcl_trailing_bytes_ignored_with_a_notice(enc):
    data, xyzi = _pcl_file(enc, trailing=b"\x00\x01junk after the points\n")
    with pytest.warns(PCDWarning, match="after the last point ignored") as rec:
        g = read_pcd(data, where="pcl.pcd")
    assert [w.message.kind for w in rec] == ["trailing bytes"]
    assert str(rec[0].message).startswith("pcl.pcd: ")
    np.testing.assert_array_equal(points_xyzi(g), xyzi)


@pytest.mark.parametrize("enc", ENCODINGS)
def test_pcl_file_shorter_than_its_header_is_a_bad_frame(enc):
    data, _ = _pcl_file(enc)
    with pytest.raises(FrameError, match="truncated|corrupt"):
        read_pcd(data[:-20], where="short.pcd")


def test_compiled_and_pure_lzf_give_the_same_bytes():
    from etl.pcd import lzf_decompress_py

    lzf = pytest.importorskip("lzf", reason="python-lzf not installed (uv sync --extra lzf)")
    rng = np.random.default_rng(3)
    raw = b"".join([rng.normal(size=5000).astype(np.float32).tobytes(), bytes(4000),
                    np.repeat(rng.integers(0, 255, 500, np.uint8), 7).tobytes()])  # fmt: skip
    comp = lzf_compress(raw)
    assert lzf.decompress(comp, len(raw)) == lzf_decompress_py(comp, len(raw)) == raw
    assert lzf_decompress(comp, len(raw)) == raw
    for bad in (comp[:-7], bytes([0xFF, 0xFF])):  # both refuse corrupt input
        with pytest.raises(ValueError):
            lzf_decompress(bad, len(raw))
        with pytest.raises(ValueError):
            lzf_decompress_py(bad, len(raw))
