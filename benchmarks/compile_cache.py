"""What JAX's persistent compilation cache saves a study's process: one evaluation unit of
``rl.study`` (a checkpoint's deterministic policy, 3 episodes × 160 s on its training track, JAX
backend) run in a fresh process with an empty cache ("cold": it compiles everything) and with
the cache the cold runs filled ("warm": what every later task of a study finds), alternating
cold and warm, and the ratio pair by pair (a shared machine's load drifts).

    python -m benchmarks.compile_cache --ckpt runs/study_cpu/ppo/pretrained_frozen_s0/ckpt
    python -m benchmarks.compile_cache --ckpt runs/<run>/ckpt --tracks austria --rounds 5

Each run is a whole process (``python -m benchmarks.compile_cache --one``: imports, checkpoint
restore, compiles, the rollout, metrics.json), so the figures are what a study task pays. The
warm and cold runs' results must agree (the cached executable is the compiled one): a run
whose laps differ fails the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(ckpt: str, tracks: list[str], out: Path, episodes: int, time_limit: float) -> None:
    from rl import evaluate
    from rl.study import use_compilation_cache

    use_compilation_cache(out)  # $JAX_COMPILATION_CACHE_DIR, set by the parent
    evaluate.evaluate_checkpoint(Path(ckpt), tracks, out / "eval", backend="jax",
                                 episodes=episodes, time_limit=time_limit,
                                 collision="terminate", perturbation=evaluate.Perturbation(),
                                 plots=False, cache=evaluate.PolicyCache(),
                                 command="benchmarks.compile_cache")  # fmt: skip


def _run(args, cache: Path, out: Path) -> tuple[float, list]:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "benchmarks.compile_cache", "--one", "--ckpt", args.ckpt,
           "--tracks", args.tracks, "--episodes", str(args.episodes), "--time-limit",
           str(args.time_limit), "--out", str(out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"benchmarks.compile_cache: a run failed ({r.returncode}): {r.stderr[-1500:]}")
    m = json.loads((out / "eval" / "metrics.json").read_text())
    laps = [ep["laps"] for mode in m["results"].values()
            for res in mode["tracks"].values() for ep in res["episodes"]]
    return wall, laps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_cache",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="runs/<run>/ckpt of a PPO run")
    ap.add_argument("--tracks", default="", help="default: the run's training track")
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=160.0)
    ap.add_argument("--rounds", type=int, default=3, help="cold/warm pairs timed")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.tracks:
        from rl.factory import restore_policy

        args.tracks = restore_policy(args.ckpt)[0].env.track
    if args.one:
        one(args.ckpt, args.tracks.split(","), Path(args.out), args.episodes, args.time_limit)
        return 0
    work = Path(tempfile.mkdtemp(prefix="compile_cache_"))
    try:
        warm_cache = work / "warm"
        _run(args, warm_cache, work / "fill")  # fills the warm cache (not timed)
        cold, warm, ratios, laps = [], [], [], None
        for i in range(args.rounds):
            cold_cache = work / f"cold{i}"
            c, lc = _run(args, cold_cache, work / f"c{i}")
            w, lw = _run(args, warm_cache, work / f"w{i}")
            shutil.rmtree(cold_cache, ignore_errors=True)
            if lc != lw or (laps is not None and lc != laps):
                sys.exit(f"benchmarks.compile_cache: results differ (cold {lc}, warm {lw})")
            laps = lc
            cold.append(c)
            warm.append(w)
            ratios.append(c / w)
            print(f"round {i + 1}: cold {c:.1f} s, warm {w:.1f} s, cold/warm {c / w:.2f}",
                  flush=True)
        print(f"one evaluation unit ({args.episodes} × {args.time_limit:g} s on {args.tracks}), "
              f"whole process, median of {args.rounds}: cold {statistics.median(cold):.1f} s, "
              f"warm {statistics.median(warm):.1f} s, cold/warm {statistics.median(ratios):.2f} "
              f"(pairwise, min {min(ratios):.2f}, max {max(ratios):.2f}); laps {laps} in both")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
