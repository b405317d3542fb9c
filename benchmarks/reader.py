"""Input-pipeline throughput: the Grain reader of train.data vs raw ArrayRecord reads.

    python -m benchmarks.reader --data data_cache [--split train] [--workers 0 2] [--batches 50]

Reports samples/s (and MB/s of encoded records) for
  raw        ArrayRecordDataSource reads of the same shards in shuffled order (bytes only),
  raw+decode the same plus etl.codec.decode (what any reader must do per sample),
  grain w=N  train.data.make_dataset: shuffle → repeat → decode → batch, N worker processes,
so the Grain pipeline's overhead (and its multiprocess speed-up) can be read off directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from etl import codec
from train import data as datalib
from train.config import DataConfig


def raw(paths, n: int, decode_cfg=None, seed: int = 0) -> tuple[float, float]:
    src = ArrayRecordDataSource(paths)
    order = np.random.default_rng(seed).permutation(len(src))
    order = np.resize(order, n)
    nbytes = 0
    t = time.perf_counter()
    for i in order:
        rec = src[int(i)]
        nbytes += len(rec)
        if decode_cfg is not None:
            codec.decode(rec, decode_cfg)
    dt = time.perf_counter() - t
    return n / dt, nbytes / dt / 1e6


def grain_reader(cfg: DataConfig, batch: int, batches: int) -> float:
    it = iter(datalib.make_dataset(cfg, batch))
    next(it)  # start-up (worker processes, first reads) is not throughput
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    if hasattr(it, "close"):
        it.close()
    return batches * batch / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data_cache")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)

    paths = datalib.shard_paths(args.data, args.split)
    pre = datalib.preprocess_config(args.data)
    n = args.batch_size * args.batches
    sps, mbs = raw(paths, n)
    print(f"raw          {sps:9.1f} samples/s  {mbs:7.1f} MB/s  (ArrayRecord bytes, shuffled)")
    sps_dec, _ = raw(paths, n, pre)
    print(f"raw+decode   {sps_dec:9.1f} samples/s  (etl.codec.decode, one thread)")
    base = DataConfig(path=args.data, split=args.split, read_threads=args.threads,
                      prefetch=4 * args.batch_size)
    for w in args.workers:
        cfg = dataclasses.replace(base, worker_count=w)
        s = grain_reader(cfg, args.batch_size, args.batches)
        print(f"grain w={w:<3d}  {s:9.1f} samples/s  ({s / sps_dec:.2f}× raw+decode; batches of "
              f"{args.batch_size}, {args.threads} threads, {w} worker processes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
