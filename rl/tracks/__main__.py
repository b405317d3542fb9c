"""Build tracks' maps into the cache ahead of a run, in parallel.

A procedural track's maps are compiled on first use (~1-4 CPU-s each), in the process that
asks for them: a run drawing from a pool of thousands (``env.track_pool``) would otherwise
spend its time compiling. This fills the cache first, one worker process per core:

    python -m rl.tracks procedural:hairpin:0-1999 --workers 2

Tracks already cached are skipped; a track that cannot be built is named on one line and the
rest are built (exit 1 at the end). The cache is ``$RACEFORMER_CACHE/tracks``
(``~/.cache/raceformer/tracks`` by default).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import time

from rl.tracks.scene import CACHE_ENV


def _use_cache(path: str | None) -> None:
    """A worker's cache: the parent's when the pool started, not the forkserver's."""
    if path is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = path


def _build(name: str) -> tuple[str, str | None, float]:
    from rl.tracks import load_track

    t0 = time.perf_counter()
    try:
        load_track(name)
    except Exception as e:  # noqa: BLE001 - reported per track, the others go on
        return name, f"{type(e).__name__}: {e}", time.perf_counter() - t0
    return name, None, time.perf_counter() - t0


def available_cores() -> int:
    """The cores this process may run on (a Slurm job's allocation, not the node's)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return mp.cpu_count()


def build(names: list[str], workers: int, log=print) -> list[str]:
    """Build ``names``' maps into the cache with ``workers`` processes; returns the names
    that failed (each named on stderr with its reason; the others are built)."""
    t0 = time.perf_counter()
    failed, cpu = [], 0.0
    with contextlib.ExitStack() as stack:
        if workers == 1:  # in this process
            results = map(_build, names)
        else:  # forkserver, not fork: a fork of a process running JAX's threads may hang
            # (the server keeps the environment it started with: the cache is passed on)
            pool = stack.enter_context(mp.get_context("forkserver").Pool(
                workers, initializer=_use_cache, initargs=(os.environ.get(CACHE_ENV),)))
            results = pool.imap_unordered(_build, names)
        for i, (name, err, dt) in enumerate(results, 1):
            cpu += dt
            if err:
                failed.append(name)
                print(f"rl.tracks: {name}: {err}", file=sys.stderr, flush=True)
            if i % 50 == 0 or i == len(names):
                log(f"[tracks] {i}/{len(names)} ready, {len(failed)} failed "
                    f"({time.perf_counter() - t0:.0f} s wall)")
    log(f"[tracks] {len(names) - len(failed)} of {len(names)} tracks in the cache; "
        f"{cpu / max(len(names), 1):.2f} s each on average (cached ones ~0)")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rl.tracks", description=__doc__.split("\n\n")[0])
    ap.add_argument("tracks", help="comma-separated names; procedural:[<family>:]a-b ranges")
    ap.add_argument("--workers", type=int, default=available_cores(),
                    help="worker processes (default: one per core this process may use)")
    args = ap.parse_args(argv)
    from rl.tracks import TrackError, track_names

    try:
        names = track_names(args.tracks)
    except TrackError as e:
        print(f"rl.tracks: error: {e}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("rl.tracks: error: --workers must be >= 1", file=sys.stderr)
        return 2
    return 1 if build(names, args.workers, log=lambda m: print(m, flush=True)) else 0


if __name__ == "__main__":
    sys.exit(main())
