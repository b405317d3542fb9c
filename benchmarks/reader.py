"""Input-pipeline throughput: the Grain reader of train.data vs raw ArrayRecord reads, per core.

    python -m benchmarks.reader --data data_cache [--split train] [--workers 0 2] [--batches 60]
        [--batch-size 8] [--threads 4] [--repeats 3] [--gpus 4] [--gpu-rate 2000 10000]

Measures, in rounds (each round runs every measurement once, side by side):
  raw        ArrayRecordDataSource reads of the same shards in shuffled order (bytes only),
  raw+decode the same plus etl.codec.decode (what any reader must do per sample), one thread,
  grain w=N  train.data.make_dataset (shuffle → repeat → read → decode into the batch), with N
             worker processes (0: the reader threads of this process), timed after a warm-up
             (worker start-up, the first use of the reader's batch memory); batches are dropped
             as they arrive, as a trainer does once they are on the device,
each as samples/s of wall time *and* samples per CPU-second (user + system time of this process,
its threads and every worker process during the measurement). On a shared host the wall figure
depends on what else runs; the CPU figure is what a node's cores buy. Printed per round and as
the median over rounds:
  wall ×  = samples/s ÷ raw+decode samples/s (the pipeline's speed-up over one plain thread),
  core ×  = samples per CPU-s ÷ raw+decode samples per CPU-s (its efficiency per core;
            goal ≥ 0.8: the Grain machinery costs at most a quarter on top of read + decode),
  trainer µs/sample = CPU the training process itself spends per sample (with workers: taking
            the batches in — the one serial part, 10⁶ / it bounds one process's intake),
and what Grain's index shuffle costs per sample at this split's size (a split of < 65,536
samples pays extra: the shuffle cycle-walks a cipher over ≥ 2^16 indices). Then how many cores
a node needs to feed ``--gpus`` GPUs consuming ``--gpu-rate`` samples/s each (default: the seed
config's ~2,000 samples/s per H100 today, ~10,000 at the goal MFU; issue 15).

CPU time of live workers is read from /proc (Linux only, as are the cluster's nodes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from etl import codec
from train import data as datalib
from train.config import DataConfig

_TICK = os.sysconf("SC_CLK_TCK")


def _descendant_cpu() -> float:
    """User + system seconds of the live descendant processes of this one (from /proc)."""
    parent, ticks = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        pid = int(d.name)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    me, total = os.getpid(), 0
    for pid in ticks:
        p = parent[pid]
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me:
            total += ticks[pid]
    return total / _TICK


def own_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its descendants, live or reaped."""
    if not Path("/proc/self/stat").is_file():
        raise SystemExit("benchmarks.reader: needs /proc (Linux) to count worker CPU time")
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own_cpu_seconds() + reaped.ru_utime + reaped.ru_stime + _descendant_cpu()


@dataclasses.dataclass
class Rate:
    wall: float  # samples/s
    cpu: float  # samples per CPU-second (this process and its workers)
    own_us: float = float("nan")  # CPU µs per sample spent in this (the training) process


def raw(paths, n: int, decode_cfg=None, seed: int = 0) -> Rate:
    src = ArrayRecordDataSource(paths)
    order = np.resize(np.random.default_rng(seed).permutation(len(src)), n)
    c, t = cpu_seconds(), time.perf_counter()
    for i in order:
        rec = src[int(i)]
        if decode_cfg is not None:
            codec.decode(rec, decode_cfg)
    dt, dc = time.perf_counter() - t, cpu_seconds() - c
    return Rate(n / dt, n / max(dc, 1e-9))


def grain_reader(cfg: DataConfig, batch: int, batches: int, warmup: int) -> Rate:
    """Batches are dropped as they come (a trainer keeps a few): the reader's memory is reused."""
    it = iter(datalib.make_dataset(cfg, batch))
    for _ in range(warmup):  # start-up (workers, first reads, first use of batch memory)
        next(it)
    c, o, t = cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(it)
    dt, dc, do = time.perf_counter() - t, cpu_seconds() - c, own_cpu_seconds() - o
    if hasattr(it, "close"):
        it.close()
    n = batches * batch
    return Rate(n / dt, n / max(dc, 1e-9), do / n * 1e6)


def shuffle_cost(n: int, samples: int = 2000) -> float:
    """CPU µs per index of Grain's shuffle over ``n`` elements (part of every grain figure)."""
    ds = grain.MapDataset.range(n).shuffle(seed=0)
    c = cpu_seconds()
    for i in range(samples):
        ds[i]
    return (cpu_seconds() - c) / samples * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data_cache")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--threads", type=int, default=4, help="reader threads per process")
    ap.add_argument("--warmup", type=int, default=10,
                    help="batches per worker process read before timing starts")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every measurement")
    ap.add_argument("--gpus", type=int, default=4, help="GPUs per node to feed")
    ap.add_argument("--gpu-rate", type=float, nargs="+", default=[2000.0, 10000.0],
                    help="samples/s each GPU consumes (issue 15: ~2,000 today, ~10,000 at goal)")
    args = ap.parse_args(argv)
    for name in ("batch_size", "batches", "threads", "repeats", "gpus"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if min(args.workers) < 0 or min(args.gpu_rate) <= 0:
        ap.error("--workers must be ≥ 0 and --gpu-rate > 0")

    paths = datalib.shard_paths(args.data, args.split)
    pre = datalib.preprocess_config(args.data)
    n = args.batch_size * args.batches
    base = DataConfig(path=args.data, split=args.split, read_threads=args.threads,
                      prefetch=4 * args.batch_size)
    print(f"{args.data} [{args.split}]: batches of {args.batch_size}, {args.batches} batches per "
          f"measurement, {args.threads} reader threads per process, {os.cpu_count()} CPUs seen; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rounds: list[dict[str, Rate]] = []
    for r in range(args.repeats):
        got: dict[str, Rate] = {"raw": raw(paths, n), "raw+decode": raw(paths, n, pre)}
        for w in args.workers:
            cfg = dataclasses.replace(base, worker_count=w)
            warmup = args.warmup * max(1, w)
            got[f"grain w={w}"] = grain_reader(cfg, args.batch_size, args.batches, warmup)
        rounds.append(got)
        ref = got["raw+decode"]
        print(f"round {r + 1}: " + " · ".join(
            f"{k} {v.wall:.0f}/s {v.cpu:.0f}/CPU-s"
            + (f" (wall {v.wall / ref.wall:.2f}×, core {v.cpu / ref.cpu:.2f}×)"
               if k.startswith("grain") else "")
            for k, v in got.items()), flush=True)

    def med(name: str, field: str, relative: bool = False) -> float:
        ref = lambda g: getattr(g["raw+decode"], field) if relative else 1.0
        return statistics.median(getattr(g[name], field) / ref(g) for g in rounds)

    print(f"\nmedian of {args.repeats} round(s)   samples/s  per CPU-s   wall ×   core ×   "
          "trainer µs/sample")
    names = list(rounds[0])
    for k in names:
        line = f"  {k:<26s} {med(k, 'wall'):9.0f}  {med(k, 'cpu'):9.0f}"
        if k.startswith("grain"):
            line += (f"  {med(k, 'wall', True):7.2f}  {med(k, 'cpu', True):7.2f}  "
                     f"{med(k, 'own_us'):9.0f}")
        print(line)
    print("  (trainer µs/sample: CPU the training process itself spends per sample — all of it "
          "with 0 workers, receiving batches with N: one process can take in at most 10⁶ / that "
          "samples/s)")
    small, large = shuffle_cost(len(ArrayRecordDataSource(paths))), shuffle_cost(2**20)
    print(f"  (of each grain sample's CPU time, Grain's index shuffle takes {small:.0f} µs at this "
          f"split's size, {large:.0f} µs at 2^20 samples: it cycle-walks a cipher over ≥ 2^16 "
          "indices, so a split of fewer than 65,536 samples pays for the difference)")
    extra = (small - large) * 1e-6  # CPU-s per sample that a large split would not pay
    large_split = lambda g, k: 1 / (1 / g[k].cpu - extra) / g["raw+decode"].cpu
    derived = " · ".join(f"{k} {statistics.median(large_split(g, k) for g in rounds):.2f}"
                         for k in names if k.startswith("grain"))
    print(f"  core × with the shuffle at its 2^20-sample cost (derived: CPU per sample − the "
          f"difference): {derived}")
    print(f"\ncores a node needs to feed {args.gpus} GPUs (samples per CPU-s as measured above):")
    for k in (k for k in names if k.startswith("grain")):
        per_core = med(k, "cpu")
        need = [math.ceil(args.gpus * rate / per_core) for rate in args.gpu_rate]
        print(f"  {k:<12s} " + " · ".join(
            f"{rate:,.0f} samples/s per GPU ({args.gpus * rate:,.0f}/s): {c} cores"
            for rate, c in zip(args.gpu_rate, need, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
