"""ETL throughput: frames/s per worker of the full build vs the bare cost of reading the raw files.

    uv run python benchmarks/etl.py                       # synthetic scene drives, workers 1 and 2
    uv run python benchmarks/etl.py --src cmht_raw --workers 1 2 4
    uv run python benchmarks/etl.py --set output.reduced_jpeg_decode=false   # bit-exact decode
    uv run --extra lzf python benchmarks/etl.py --lzf-only   # LZF: compiled vs pure Python

The floor is what any ETL must pay: reading and fully decoding every raw file a sample uses
(PCD parse + JPEG/PNG decode through the same readers), on one core, with no preprocessing and
no writing. The build is ``etl.build.build`` end to end (open, sync, preprocess, encode, write
shards, index, manifest) on fresh output folders. Reported:

* floor frames/s (1 core), build frames/s at each worker count, and per worker;
* ratio = build frames/s per worker ÷ floor frames/s (wall clock; goal ≥ 0.8);
* CPU ratio = floor CPU ms per frame ÷ the build workers' CPU ms per frame — the robust figure
  on a shared host, where wall time depends on what else runs;
* with ``output.reduced_jpeg_decode`` (the default) the build decodes JPEGs at reduced scale,
  which the floor does not; so the CPU ratio against a *same-decode floor* (the floor with the
  build's reduced decoding) is printed too: it says what the ETL's own work costs;
* scaling = build frames/s at N workers ÷ at 1 worker (ideal N);
* a per-stage breakdown (CPU ms per sweep) of one worker's work, to show where the time goes;
* LZF (binary_compressed PCDs): the same payload (a 32-beam sweep's fields, struct of arrays)
  decompressed by the compiled liblzf (``python-lzf``, the ``lzf`` extra) and by the pure-Python
  fallback, M points/s each and the ratio (``--lzf-only`` runs just this).

OpenCV runs single-threaded everywhere (as in the build's workers) so that "per core" holds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from etl import build as B  # noqa: E402
from etl import codec, configlib  # noqa: E402
from etl.config import ETLConfig  # noqa: E402
from etl.pcd import HAVE_COMPILED_LZF, lzf_compress, lzf_decompress_py  # noqa: E402
from etl.preprocess import (  # noqa: E402
    bev_lidar,
    bev_radar,
    preprocess_ir,
    preprocess_rgb,
    transform_points,
)
from etl.sync import sync_drive  # noqa: E402


def _open(ref, cfg):
    return B._resolve(ref.opener)(Path(ref.path), ref.drive_id, cfg)


def _used_frames(drive, cfg):
    table = sync_drive(drive, cfg.sync)
    return table, {m: table.index[m][table.index[m] >= 0] for m in ("lidar", "radar", "rgb", "ir")}


def floor(refs, cfg, same_decode: bool = False) -> tuple[int, float, float]:
    """Read + decode every raw frame the build uses, one core: (sweeps, wall s, CPU s).

    The floor proper decodes every image in full. ``same_decode``: decode images exactly as
    the build does (at reduced scale where ``output.reduced_jpeg_decode`` allows it), the
    stricter yardstick for what the rest of the ETL costs.
    """
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for ref in refs:
        drive = _open(ref, cfg)
        table, used = _used_frames(drive, cfg)
        for m, idx in used.items():
            stream = getattr(drive, m)
            hint = B._decode_hint(cfg) if same_decode and m in ("rgb", "ir") else None
            with hint or contextlib.nullcontext():
                for j in idx:
                    try:
                        stream.load(int(j))
                    except Exception:  # noqa: BLE001 — a bad frame costs what it costs
                        pass
        n += len(table)
    return n, time.perf_counter() - t0, time.process_time() - c0


def stages(refs, cfg) -> dict[str, float]:
    """CPU ms per sweep of each step of one worker's work (read, preprocess, encode, write)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    pc = cfg.preprocess
    acc: dict[str, float] = {}
    n = 0
    clock = time.process_time  # CPU time: a busy shared host inflates wall time, not this

    def tick(key, t):
        now = clock()
        acc[key] = acc.get(key, 0.0) + now - t
        return now

    tmp = tempfile.mkdtemp(prefix="raceformer-stages-")
    writer = ArrayRecordWriter(os.path.join(tmp, "s.array_record"), B.writer_options(cfg.output))
    for ref in refs:
        drive = _open(ref, cfg)
        table, _ = _used_frames(drive, cfg)
        for i in range(len(table)):
            t = clock()
            try:
                pts = drive.lidar.load(i)
            except Exception:  # noqa: BLE001
                continue
            t = tick("read lidar", t)
            bev_lidar(pts, pc.lidar)
            t = tick("bev lidar", t)
            for m in ("radar", "rgb", "ir"):
                j = int(table.index[m][i])
                if j < 0:
                    continue
                t = clock()
                try:
                    with B._decode_hint(cfg) if m != "radar" else contextlib.nullcontext():
                        raw = getattr(drive, m).load(j)
                except Exception:  # noqa: BLE001
                    continue
                t = tick(f"read {m}", t)
                if m == "radar":
                    p = transform_points(raw, drive.calib.radar_to_vehicle)
                    bev_radar(p[:, :3], p[:, 3], pc.radar)
                    tick("bev radar", t)
                elif m == "rgb":
                    preprocess_rgb(raw, pc.image)
                    tick("preprocess rgb", t)
                else:
                    preprocess_ir(raw, pc.image)
                    tick("preprocess ir", t)
            t = clock()
            sample, _ = B.make_sample(drive, table, i, cfg)
            t = tick("(make_sample, all of the above)", t)
            rec = codec.encode(
                sample, {"drive": ref.drive_id, "frame": i}, cfg.output.storage_dtype
            )
            t = tick("encode", t)
            writer.write(rec)
            tick(f"write ({cfg.output.compression})", t)
            n += 1
    writer.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {k: 1000 * v / max(n, 1) for k, v in acc.items()}


def lzf_section(points: int = 57_600, repeat: int = 5) -> None:
    """Decompress one LZF payload both ways; print M points/s each and the ratio."""
    import numpy as np

    rng = np.random.default_rng(0)
    r = rng.uniform(1, 60, points)
    a = rng.uniform(-np.pi, np.pi, points)
    soa = b"".join([  # x y z intensity (f4), ring (u2), time (f8): a Velodyne sweep's fields
        (r * np.cos(a)).astype(np.float32).tobytes(), (r * np.sin(a)).astype(np.float32).tobytes(),
        rng.normal(0, 1, points).astype(np.float32).tobytes(),
        rng.integers(0, 256, points).astype(np.float32).tobytes(),
        (np.arange(points) % 32).astype(np.uint16).tobytes(),
        np.sort(rng.uniform(0, 0.1, points)).tobytes(),
    ])  # fmt: skip
    comp = lzf_compress(soa)

    def best(fn) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn(comp, len(soa))
            times.append(time.perf_counter() - t0)
            assert out == soa
        return min(times)

    t_py = best(lzf_decompress_py)
    print(f"\nLZF decompression — {points} points, {len(soa) / 1e6:.2f} MB from "
          f"{len(comp) / 1e6:.2f} MB, best of {repeat}:")  # fmt: skip
    print(f"  pure Python  {t_py * 1e3:8.2f} ms  {points / t_py / 1e6:8.2f} M points/s")
    if not HAVE_COMPILED_LZF:
        print("  compiled     not installed (python-lzf: uv sync --extra lzf)")
        return
    import lzf

    t_c = best(lzf.decompress)
    print(f"  compiled     {t_c * 1e3:8.2f} ms  {points / t_c / 1e6:8.2f} M points/s")
    print(f"  ratio (pure ÷ compiled time): {t_py / t_c:.1f}×")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, help="raw drives (default: synthesize scene drives)")
    ap.add_argument("--drives", type=int, default=2, help="synthetic drives (default 2)")
    ap.add_argument("--frames", type=int, default=60, help="sweeps per synthetic drive")
    ap.add_argument("--format", default="scene", choices=("scene", "bag", "both"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (best kept)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    ap.add_argument("--lzf-only", action="store_true", help="only the LZF decompression section")
    args = ap.parse_args(argv)
    if args.lzf_only:
        lzf_section()
        return 0
    cv2.setNumThreads(1)
    cfg = configlib.cli_load("benchmarks.etl", ETLConfig, None, args.set)
    if cfg is None:
        return configlib.EXIT_CONFIG
    tmp = Path(tempfile.mkdtemp(prefix="raceformer-bench-"))
    try:
        src = args.src
        if src is None:
            src = tmp / "raw"
            print(
                f"synthesizing {args.drives} {args.format} drive(s) × {args.frames} sweeps …",
                file=sys.stderr,
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "etl.synth",
                    "--out",
                    str(src),
                    "--drives",
                    str(args.drives),
                    "--frames",
                    str(args.frames),
                    "--format",
                    args.format,
                ],
                cwd=ROOT,
                check=True,
                stdout=subprocess.DEVNULL,
            )
        refs, _ = B.discover(src, cfg)
        if not refs:
            print(f"{src}: no drives", file=sys.stderr)
            return 1
        floor(refs, cfg)  # warm the page cache: both sides then read from memory
        fl = min((floor(refs, cfg) for _ in range(args.repeat)), key=lambda r: r[2])
        n_floor, s_floor, c_floor = fl
        reduced = cfg.output.reduced_jpeg_decode
        fl_same = (
            min((floor(refs, cfg, True) for _ in range(args.repeat)), key=lambda r: r[2])
            if reduced
            else fl
        )
        rows = []
        for w in args.workers:
            best = None
            for _ in range(args.repeat):
                out = tmp / f"out-w{w}"
                t0 = time.perf_counter()
                res = B.build(refs, out, cfg, workers=w, progress=False)
                sec = time.perf_counter() - t0
                shutil.rmtree(out)
                if best is None:
                    best = (sec, res.cpu_s)
                best = (min(best[0], sec), min(best[1], res.cpu_s))
            n = sum((m.get("frames") or 0) for m in res.manifest["drives"].values())
            rows.append((w, n, best[0], n / best[0], best[1]))
        st = stages(refs, cfg)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    fps_floor = n_floor / s_floor
    cpu_floor = 1000 * c_floor / n_floor
    cpu_same = 1000 * fl_same[2] / fl_same[0]
    print(
        f"\nETL benchmark — {len(refs)} drive(s), {n_floor} sweeps, {os.cpu_count()} CPUs visible, "
        f"best of {args.repeat}; output.compression={cfg.output.compression}, "
        f"output.reduced_jpeg_decode={reduced}"
    )
    print(
        f"floor (read + full decode of the raw files, 1 core): {fps_floor:8.1f} frames/s "
        f"({1000 / fps_floor:.2f} ms/frame wall, {cpu_floor:.2f} ms CPU)"
    )
    if reduced:
        n_same, s_same = fl_same[0], fl_same[1]
        print(
            f"same-decode floor (JPEGs decoded at the build's reduced scale): "
            f"{n_same / s_same:8.1f} frames/s ({1000 * s_same / n_same:.2f} ms/frame wall, "
            f"{cpu_same:.2f} ms CPU)"
        )
    print(
        f"{'workers':>7} {'frames':>7} {'wall s':>8} {'frames/s':>9} {'per worker':>10} "
        f"{'ratio':>6} {'scaling':>7} {'CPU ms/frame':>12} {'CPU ratio':>9}"
        + (f" {'CPU ratio (same decode)':>23}" if reduced else "")
    )
    base = rows[0][3]
    for w, n, sec, fps, cpu in rows:
        cpu_ms = 1000 * cpu / n
        print(
            f"{w:>7} {n:>7} {sec:>8.2f} {fps:>9.1f} {fps / w:>10.1f} {fps / w / fps_floor:>6.2f} "
            f"{fps / base:>7.2f} {cpu_ms:>12.2f} {cpu_floor / cpu_ms:>9.2f}"
            + (f" {cpu_same / cpu_ms:>23.2f}" if reduced else "")
        )
    print("ratio = build frames/s per worker ÷ floor frames/s (wall clock; goal ≥ 0.8);")
    print("CPU ratio = floor CPU per frame ÷ build worker CPU per frame (robust to a busy host);")
    print("scaling = frames/s ÷ frames/s at the first worker count (ideal = workers ratio)")
    print("best of the repeats, wall and CPU each; the floor is the run with the least CPU")
    print("\nper-stage CPU cost of one worker (ms per sweep):")
    for k, v in st.items():
        print(f"  {k:<34} {v:7.2f}")
    lzf_section()
    return 0


if __name__ == "__main__":
    sys.exit(main())
