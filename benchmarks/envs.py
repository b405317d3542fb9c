"""Simulator throughput (issue 4 §5): environment steps per second.

    uv run python -m benchmarks.envs                      # JAX on the default device
    uv run python -m benchmarks.envs --envs 1024 4096 --steps 100 --camera
    uv run python -m benchmarks.envs --calibrate          # car figures, both backends
    uv run python -m benchmarks.envs --fit                # refit jax_env.Dynamics to PyBullet
    uv run python -m benchmarks.envs --bullet --envs 1024 # PyBullet per core vs JAX, the ratio

bench_jax: the pure-JAX backend, N cars in one jitted lax.scan of the step PPO trains with
(rl.envs.functional.RacecarFunctional, vmapped: 4 physics steps and one lidar scan per
policy step, auto-resetting) (random resets, a fixed steering/motor pattern), lidar only
and optionally with the column-cast RGB camera; steps/s counts physics steps (racecar_gym's
env steps). Compile time is excluded and reported.
bench_bullet: one PyBullet car per core, the same driving pattern; with both, the per-core
ratio (issue 4 §5 goal: JAX on CPU >= 50x PyBullet per core), two ways: the JAX run pinned
to one core (a child process with its CPU affinity set before JAX starts) against one
PyBullet car's CPU time, and the all-core JAX run divided by the core count (which also
pays XLA's imperfect multi-core scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp


def bench_jax(num_envs: int = 1024, steps: int = 100, camera: bool = False,
              track: str = "procedural:0", camera_size: int = 64, repeats: int = 2,
              lidar_rays: int = 1080, action_repeat: int = 4) -> dict:
    """Physics steps/s of `num_envs` JAX cars over `steps` physics steps, through the step
    PPO trains with: :class:`rl.envs.functional.RacecarFunctional` (``action_repeat``
    physics steps and one lidar scan per policy step, auto-reset), vmapped, in one jitted
    ``lax.scan``."""
    from rl import factory
    from rl.envs.functional import RacecarFunctional
    from rl.envs.jax_env import make_params
    from rl.envs.spec import TaskConfig

    params = make_params(track)  # the production path: cropped, cache-sized maps
    sim = factory.make_sim(TaskConfig(reset_mode="random"), camera=camera,
                           camera_width=camera_size, camera_height=camera_size,
                           lidar_rays=lidar_rays)
    env = RacecarFunctional(sim, lambda obs: obs, action_repeat)
    n_policy = max(1, steps // action_repeat)
    reset = jax.vmap(env.reset, in_axes=(0, None))
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def run(key, params):
        obs, state = reset(jax.random.split(key, num_envs), params)
        phase = jnp.linspace(0.0, 6.28, num_envs)

        def body(carry, t):
            st, acc = carry
            a = jnp.stack([jnp.full((num_envs,), 0.5), 0.5 * jnp.sin(phase + 0.2 * t)], 1)
            keys = jax.random.split(jax.random.fold_in(key, t), num_envs)
            ob, st, r, *_ = step(keys, st, a, params)
            chk = acc + r.sum() + ob["lidar"][:, 0].sum()
            if "rgb_camera" in ob:
                chk = chk + ob["rgb_camera"][:, 0, 0, 0].sum()
            return (st, chk), None

        (state, chk), _ = jax.lax.scan(body, (state, jnp.float32(0)), jnp.arange(n_policy))
        return chk

    f = jax.jit(run)
    t0 = time.perf_counter()
    jax.block_until_ready(f(jax.random.PRNGKey(0), params))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(jax.random.PRNGKey(i + 1), params))
        best = min(best, time.perf_counter() - t0)
    physics = num_envs * n_policy * action_repeat
    return {"backend": "jax", "device": jax.devices()[0].platform, "envs": num_envs,
            "steps": n_policy * action_repeat, "camera": camera, "seconds": best,
            "compile_s": compile_s, "steps_per_s": physics / best,
            "policy_steps_per_s": num_envs * n_policy / best}


def bench_jax_pinned(cpu: int = 0, **kw) -> dict:
    """bench_jax in a child process restricted to one CPU core (affinity set before JAX and
    its thread pool start): the JAX backend's throughput per core."""
    code = ("import json, sys; from benchmarks.envs import bench_jax; "
            "print(json.dumps(bench_jax(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], check=True,
                         capture_output=True, text=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["device"] = "cpu×1"
    return row


def bench_bullet(steps: int = 2000, camera: bool = False, track: str = "procedural:0",
                 warmup: int = 50) -> dict:
    """Steps/s of ONE PyBullet car in this process (= per core), lidar only or with the 128×128
    ER_TINY_RENDERER camera (both refreshed at 25 Hz, every 4th step, as racecar_gym does).

    Drives the same pattern as bench_jax (motor 0.5, a slow steering sine) with random resets
    when an episode ends. Reports wall-clock and CPU-time rates (the latter is robust on a
    shared machine) and the cost of one lidar scan / camera frame."""
    import numpy as np

    from rl.envs.bullet import BulletRacecarEnv
    from rl.envs.spec import TaskConfig

    env = BulletRacecarEnv(track, TaskConfig(reset_mode="random"), camera=camera)
    env.reset(seed=0)
    act = {"motor": np.array([0.5], np.float32), "steering": np.zeros(1, np.float32)}
    for _ in range(warmup):
        env.step(act)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in range(steps):
        act["steering"][0] = 0.5 * np.sin(0.05 * t)
        *_, term, trunc, _ = env.step(act)
        if term or trunc:
            env.reset()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = 20
    c1 = time.process_time()
    for _ in range(n):
        env._scan()
    scan_ms = (time.process_time() - c1) / n * 1e3
    cam_ms = 0.0
    if camera:
        c1 = time.process_time()
        for _ in range(n):
            env._camera_image(env.cam_w, env.cam_h)
        cam_ms = (time.process_time() - c1) / n * 1e3
    env.close()
    return {"backend": "bullet", "device": "cpu", "envs": 1, "steps": steps, "camera": camera,
            "seconds": wall, "compile_s": 0.0, "steps_per_s": steps / wall,
            "cpu_steps_per_s": steps / max(cpu, 1e-9), "scan_ms": scan_ms, "camera_ms": cam_ms}


def calibration_table() -> list[tuple[str, float, float]]:
    """rl.envs.calibration.calibrate_bullet() (open floor at the tracks' friction) next to the
    same protocol run on the JAX car's Dynamics (calibrate_jax)."""
    from rl.envs.calibration import calibrate_bullet, calibrate_jax

    b, j = calibrate_bullet(), calibrate_jax()
    rows = [(k, b[k], j[k]) for k in b]
    print(f"{'figure':38} {'pybullet':>9} {'jax':>9}")
    for k, x, y in rows:
        print(f"{k:38} {x:9.3f} {y:9.3f}")
    return rows


# open-floor protocols for fit_dynamics: name -> (steps, policy(i) -> (actuator, a, steering))
_SPEED_2 = 2.0 / 3.5 * 2.0 - 1.0  # speed-actuator command for 2 m/s
FIT_PROTOCOLS = {
    "motor_1": (800, lambda i: ("motor", 1.0, 0.0)),
    "motor_0.3": (800, lambda i: ("motor", 0.3, 0.0)),
    **{f"brake_{m}": (900, lambda i, m=m: ("motor", 1.0 if i < 500 else m, 0.0))
       for m in (-1.0, -0.3, 0.0)},
    **{f"speed_{v}": (600, lambda i, c=v / 3.5 * 2.0 - 1.0: ("speed", c, 0.0))
       for v in (1.0, 2.0, 3.0)},
    **{f"steer_{s}": (900, lambda i, s=s: ("speed", _SPEED_2, s if i >= 300 else 0.0))
       for s in (1.0, -1.0)},
    "motor_0.5_steer_1": (600, lambda i: ("motor", 0.5, 1.0 if i >= 200 else 0.0)),
}
FIT_FIELDS = ("steer_tau", "understeer", "accel_max", "motor_gamma", "slip_gain", "drag",
              "rolling", "brake_max", "brake_gamma", "force_fade", "brake_slip")


def fit_dynamics(max_nfev: int = 300) -> dict:
    """Least-squares fit of jax_env.Dynamics to PyBullet open-floor traces (speed curves,
    and yaw-rate curves smoothed over 0.15 s) at the tracks' floor friction; prints and
    returns the fitted fields (then check them with --calibrate and the parity tests)."""
    from dataclasses import replace

    import numpy as np
    from scipy.optimize import least_squares

    from rl.envs.calibration import open_floor_bullet, open_floor_jax
    from rl.envs.jax_env import Dynamics

    with open_floor_bullet() as car:  # the tracks' floor friction
        ref = {k: car.run(pol, n) for k, (n, pol) in FIT_PROTOCOLS.items()}

    def smooth(x):
        return np.convolve(x, np.ones(15) / 15, mode="same")

    def resid(x):
        dyn = replace(Dynamics(), **dict(zip(FIT_FIELDS, x, strict=True)))
        out = []
        for k, (n, pol) in FIT_PROTOCOLS.items():
            sim, tr = open_floor_jax(dyn, pol, n), ref[k]
            if k.startswith("steer") or "steer" in k:
                out += [(smooth(tr[:, 4]) - sim[:, 4])[::5], 0.5 * (tr[:, 3] - sim[:, 3])[::5]]
            else:
                out.append((tr[:, 3] - sim[:, 3])[::5])
        return np.concatenate(out)

    x0 = [getattr(Dynamics(), f) for f in FIT_FIELDS]
    lb = [0.005, 0, 1, 0, 1, 0, 0, 0, 0.2, 0, 0.5]
    ub = [0.5, 0.1, 20, 1.5, 200, 3, 3, 20, 3, 1, 50]
    res = least_squares(resid, x0, bounds=(lb, ub), x_scale="jac", max_nfev=max_nfev)
    fitted = {k: round(float(v), 4) for k, v in zip(FIT_FIELDS, res.x, strict=True)}
    print(f"rms residual {np.sqrt(np.mean(resid(x0) ** 2)):.3f} (current Dynamics) -> "
          f"{np.sqrt(np.mean(res.fun ** 2)):.3f} (fitted)")
    print(fitted)
    return fitted


def print_table(rows: list[dict]) -> None:
    print(f"{'backend':8} {'device':6} {'envs':>6} {'steps':>6} {'camera':>6} "
          f"{'run s':>8} {'compile s':>9} {'steps/s':>12}")
    for r in rows:
        print(f"{r['backend']:8} {r['device']:6} {r['envs']:6d} {r['steps']:6d} "
              f"{str(r['camera']):>6} {r['seconds']:8.3f} {r.get('compile_s', 0):9.1f} "
              f"{r['steps_per_s']:12,.0f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", type=int, nargs="+", default=[1024])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--camera", action="store_true", help="also run with the RGB camera")
    ap.add_argument("--camera-size", type=int, default=64)
    ap.add_argument("--track", default="procedural:0")
    ap.add_argument("--bullet", action="store_true",
                    help="also run the PyBullet backend (one car per core), and the ratio")
    ap.add_argument("--bullet-steps", type=int, default=2000)
    ap.add_argument("--no-jax", action="store_true", help="skip bench_jax")
    ap.add_argument("--no-pinned", action="store_true",
                    help="with --bullet, skip the JAX run pinned to one core")
    ap.add_argument("--calibrate", action="store_true",
                    help="print the car's calibration figures in both backends and exit")
    ap.add_argument("--fit", action="store_true",
                    help="least-squares fit of the JAX car's Dynamics to PyBullet, and exit")
    args = ap.parse_args(argv)
    if args.fit:
        fit_dynamics()
        return
    if args.calibrate:
        calibration_table()
        return
    rows = []
    if args.bullet:
        for cam in (False, True):
            rows.append(bench_bullet(args.bullet_steps, cam, args.track))
            r = rows[-1]
            print_table([r])
            print(f"  bullet per core: {r['cpu_steps_per_s']:,.0f} steps/s of CPU time; "
                  f"lidar scan {r['scan_ms']:.2f} ms, camera frame {r['camera_ms']:.2f} ms")
        if args.no_jax:
            return
    for n in args.envs:
        for cam in ([False, True] if args.camera else [False]):
            rows.append(bench_jax(n, args.steps, cam, args.track, args.camera_size))
            print_table(rows[-1:])
        if args.bullet and not args.no_pinned:
            rows.append(bench_jax_pinned(num_envs=n, steps=args.steps, track=args.track))
            print_table(rows[-1:])
    print()
    print_table(rows)
    bullet = [r for r in rows if r["backend"] == "bullet" and not r["camera"]]
    if not bullet:
        return
    per_core = bullet[0]["cpu_steps_per_s"]
    cores = len(os.sched_getaffinity(0))
    jax_all = [r for r in rows if r["backend"] == "jax" and r["device"] == "cpu"
               and not r["camera"]]
    jax_one = [r for r in rows if r["backend"] == "jax" and r["device"] == "cpu×1"]
    print(f"PyBullet, one car, lidar only: {per_core:,.0f} steps/s per core (CPU time)")
    if jax_one:
        best = max(r["steps_per_s"] for r in jax_one)
        print(f"ratio per core, JAX pinned to 1 core / PyBullet: {best / per_core:,.1f}x")
    if jax_all:
        best = max(r["steps_per_s"] for r in jax_all)
        print(f"ratio per core, JAX on all {cores} cores / {cores} / PyBullet: "
              f"{best / cores / per_core:,.1f}x")


if __name__ == "__main__":
    main()
