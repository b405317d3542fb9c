"""Simulator throughput (issue 4 §5): environment steps per second.

    uv run python -m benchmarks.envs                      # JAX on the default device
    uv run python -m benchmarks.envs --envs 1024 4096 --steps 100 --camera
    uv run python -m benchmarks.envs --calibrate          # car figures, both backends
    uv run python -m benchmarks.envs --fit                # refit jax_env.Dynamics to PyBullet
    uv run python -m benchmarks.envs --grid 'speed_brake_loss=0.5,0.7;speed_brake_slip0=0.4,0.5'
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


def calibration_table() -> list[tuple]:
    """rl.envs.calibration.calibrate_bullet() (open floor at the tracks' friction) next to the
    same protocol run on each JAX car (calibrate_jax, jax_env.CARS): rows (figure, PyBullet,
    then one column per car)."""
    from rl.envs.calibration import calibrate_bullet, calibrate_jax
    from rl.envs.jax_env import CARS, car

    b = calibrate_bullet()
    j = {m: calibrate_jax(car(m)) for m in CARS}
    rows = [(k, b[k], *(j[m][k] for m in CARS)) for k in b]
    print(f"{'figure':38} {'pybullet':>9} " + " ".join(f"{m:>9}" for m in CARS))
    for k, *xs in rows:
        print(f"{k:38} " + " ".join(f"{x:9.3f}" for x in xs))
    return rows


# open-floor protocols for fit_dynamics: name -> (steps, policy(i) -> (actuator, a, steering))
_SPEED_2 = 2.0 / 3.5 * 2.0 - 1.0  # speed-actuator command for 2 m/s


def _slalom(a: float):
    """Speed action 1.0 straight for 3 s, then speed action a with full lock, the side
    swapped every 0.5 s."""
    return lambda i: ("speed", 1.0, 0.0) if i < 300 else (
        "speed", a, 1.0 if (i - 300) // 50 % 2 == 0 else -1.0)


def _brake_turn(m: float, s: float, entry_steps: int):
    """Full throttle for entry_steps (300: ~3.7 m/s, 90: ~2.3 m/s), then motor m < 0 at
    steering s."""
    return lambda i: ("motor", 1.0, 0.0) if i < entry_steps else ("motor", m, s)


def fit_protocols() -> dict:
    from rl.envs.calibration import LOCK_ENTRY, scrub_policy

    return {
        "motor_1": (800, lambda i: ("motor", 1.0, 0.0)),
        "motor_0.3": (800, lambda i: ("motor", 0.3, 0.0)),
        **{f"brake_{m}": (900, lambda i, m=m: ("motor", 1.0 if i < 500 else m, 0.0))
           for m in (-1.0, -0.3, 0.0)},
        **{f"speed_{v}": (600, lambda i, c=v / 3.5 * 2.0 - 1.0: ("speed", c, 0.0))
           for v in (1.0, 2.0, 3.0)},
        **{f"steer_{s}": (900, lambda i, s=s: ("speed", _SPEED_2, s if i >= 300 else 0.0))
           for s in (1.0, -1.0)},
        "motor_0.5_steer_1": (600, lambda i: ("motor", 0.5, 1.0 if i >= 200 else 0.0)),
        # cornering at speed (calibration.SCRUB_*, 3 s of turn rather than 1.5), a left turn,
        # and the straight speed-actuator transitions the turns start from
        **{f"scrub_{a}_{s}": (600, scrub_policy(a, s))
           for a in (1.0, 0.6, 0.2) for s in (1.0, 0.6, 0.3, 0.0)},
        "scrub_1.0_-1.0": (600, scrub_policy(1.0, -1.0)),
        # slower steady turns (speed action -0.2: ~1.6 m/s, -0.5: ~0.9 m/s)
        **{f"turn_{e}_{s}": (600, scrub_policy(e, s, entry=e))
           for e in (-0.2, -0.5) for s in (1.0, 0.6)},
        **{f"slalom_{a}": (600, _slalom(a)) for a in (1.0, 0.6)},
        "motor_1_steer_1": (600, lambda i: ("motor", 1.0, 1.0 if i >= 300 else 0.0)),
        # brake and turn (the motor actuator's braked wheels slide; Dynamics.brake_yaw_*)
        **{f"brake_turn_{m}_{s}": (450, _brake_turn(m, s, 300))
           for m in (-1.0, -0.3, -0.1, -0.03) for s in (1.0, -0.5)},
        **{f"brake_turn_slow_{m}": (240, _brake_turn(m, 1.0, 90)) for m in (-1.0, -0.1)},
        # hard braking into a turn with the speed actuator (its wheels held near standstill
        # slide; Dynamics.speed_brake_*), 2 s from ~2.9 m/s
        **{f"lock_{a}_{s}": (500, scrub_policy(a, s, entry=LOCK_ENTRY))
           for a in (-1.0, -0.8, -0.6, -0.3) for s in (1.0, 0.6, -1.0)},
    }


# the fitted fields of jax_env.Dynamics and their bounds, in two groups: the straight line
# (fitted first; the cornering model does not touch a car driving straight) and cornering
FIT_BOUNDS = {
    "accel_max": (1, 20), "motor_gamma": (0, 1.5), "slip_gain": (1, 200), "drag": (0, 3),
    "rolling": (0, 3), "brake_max": (0, 20), "brake_gamma": (0.2, 3), "force_fade": (0, 1),
    "brake_slip": (0.5, 50),
    "steer_tau": (0.005, 0.5), "steer_rate": (0.5, 20),
    "tyre_peak": (0.5, 10), "tyre_stiffness": (5, 2000), "tyre_shape": (1.0, 1.95),
    "yaw_inertia": (0.01, 0.5), "cornering_drag": (0, 50), "traction_lateral": (0, 50),
    "brake_yaw_loss": (0, 1.5), "brake_yaw_loss_slope": (-1.5, 1.5),
    "brake_yaw_loss_v": (0.3, 10),
    "speed_brake_loss": (0, 1.5), "speed_brake_slip0": (0, 0.95), "speed_brake_loss_v": (0.1, 5),
}
FIT_GROUPS = {"straight": tuple(FIT_BOUNDS)[:9], "steering": tuple(FIT_BOUNDS)[9:11],
              "cornering": tuple(FIT_BOUNDS)[11:20], "lock": tuple(FIT_BOUNDS)[20:]}
FIT_GROUPS["all"] = tuple(FIT_BOUNDS)


def bullet_traces(path: str | None = None) -> dict:
    """PyBullet open-floor traces of every fit protocol (name -> (n, 5) rows of x, y, yaw,
    planar speed, yaw rate; the tracks' floor friction). ``path``: an .npz cache — read if it
    exists (it must hold every protocol, at its length), else written after the runs."""
    import numpy as np

    from rl.envs.calibration import open_floor_bullet

    protocols = fit_protocols()
    if path and os.path.exists(path):
        with np.load(path) as z:
            ref = {k: z[k] for k in z.files}
        bad = [k for k, (n, _) in protocols.items() if k not in ref or ref[k].shape != (n, 5)]
        if bad:
            raise SystemExit(f"{path}: traces missing or of the wrong length for {bad}; "
                             "delete the file to rerun PyBullet")
        return {k: ref[k] for k in protocols}
    with open_floor_bullet() as car:  # the tracks' floor friction
        ref = {k: car.run(pol, n) for k, (n, pol) in protocols.items()}
    if path:
        np.savez(path, **ref)
        print(f"saved PyBullet traces of {len(ref)} protocols to {path}")
    return ref


def _fit_problem(traces: str | None, fields: str, turn_speed_weight: float, base: str,
                 protocols_prefix: str = ""):
    """The fitted fields (names), ``resid_many(xs)`` — residuals of K parameter sets (K,
    fields) -> (K, m) against the PyBullet traces, in one batch — the base car's values of the
    fields (x0) and their bounds (lb, ub); see :func:`fit_dynamics`. ``protocols_prefix``:
    only the protocols whose names start with it."""
    from dataclasses import replace

    import numpy as np

    from rl.envs.calibration import open_floor_jax_batch, policy_actions
    from rl.envs.jax_env import car

    names_ = FIT_GROUPS.get(fields) or tuple(f.strip() for f in fields.split(","))
    bad = [f for f in names_ if f not in FIT_BOUNDS]
    if bad:
        raise SystemExit(f"--fields: unknown {bad}; groups {list(FIT_GROUPS)} or fields "
                         f"{list(FIT_BOUNDS)}")
    ref = bullet_traces(traces)
    protocols = {k: v for k, v in fit_protocols().items() if k.startswith(protocols_prefix)}
    if not protocols:
        raise SystemExit(f"no fit protocol starts with {protocols_prefix!r}")
    names = list(protocols)
    n_max = max(n for n, _ in protocols.values())
    acts = [np.zeros((len(names), n_max), dt) for dt in (bool, np.float64, np.float64)]
    for j, k in enumerate(names):
        n, pol = protocols[k]
        for x, y in zip(acts, policy_actions(pol, n), strict=True):
            x[j, :n], x[j, n:] = y, y[-1]

    turning = [any(t in k for t in ("steer", "scrub", "turn", "slalom", "lock")) for k in names]
    kernel = np.ones(15) / 15
    ref_w = {k: np.convolve(ref[k][:, 4], kernel, mode="same") for k in names}

    def resid_many(xs):
        """Residuals of K parameter sets (K, fields) -> (K, m), in one batch of K x P runs
        (the fields as arrays: car_step broadcasts them)."""
        xs = np.atleast_2d(xs)
        k_, p_ = len(xs), len(names)
        dyn = replace(car(base), **{f: np.repeat(xs[:, i], p_) for i, f in enumerate(names_)})
        sims = open_floor_jax_batch(dyn, *(np.tile(a, (k_, 1)) for a in acts))
        sims = sims.reshape(k_, p_, n_max, 5)
        out = []
        for j, k in enumerate(names):
            n, tr = protocols[k][0], ref[k]
            sim = sims[:, j, :n]
            w_v = turn_speed_weight if turning[j] else 1.0
            out.append((tr[:, 3] - sim[..., 3])[:, ::5] * w_v)
            if turning[j]:
                out.append((ref_w[k] - sim[..., 4])[:, ::5])
        return np.concatenate(out, axis=1)

    lb, ub = (np.array(b, np.float64) for b in zip(*(FIT_BOUNDS[f] for f in names_),
                                                   strict=True))
    x0 = np.array([getattr(car(base), f) for f in names_], np.float64)
    return names_, resid_many, x0, lb, ub


def fit_dynamics(max_nfev: int = 300, traces: str | None = None,
                 fields: str = "cornering", turn_speed_weight: float = 0.5,
                 base: str = "tyre") -> dict:
    """Least-squares fit of the tyre car (jax_env.car("tyre")) to PyBullet open-floor traces
    (speed curves, and yaw-rate curves smoothed over 0.15 s) at the tracks' floor friction;
    prints and returns the fitted fields (then check them with --calibrate and the parity tests).
    ``traces``: an .npz cache of the PyBullet runs (:func:`bullet_traces`). ``fields``: a
    group of FIT_GROUPS ("cornering": the steering and the tyre, with the straight-line
    constants as they are; "straight"; "all") or comma-separated Dynamics fields.
    ``turn_speed_weight``: the weight of a turning protocol's speed residual (m/s) next to
    its yaw-rate residual (rad/s, weight 1); a straight one's speed has weight 1. ``base``:
    the car (jax_env.CARS) whose other constants stay and whose fields the fit starts from."""
    import numpy as np
    from scipy.optimize import least_squares

    names_, resid_many, x0, lb, ub = _fit_problem(traces, fields, turn_speed_weight, base)

    def jac(x):  # forward differences, every perturbed set in the same batch
        h = 1e-4 * np.maximum(np.abs(x), 1e-2)
        h = np.where(x + h > ub, -h, h)
        r = resid_many(np.vstack([x, x + np.diag(h)]))
        return ((r[1:] - r[0]) / h[:, None]).T

    t0 = time.perf_counter()
    res = least_squares(lambda x: resid_many(x)[0], x0, jac=jac, bounds=(lb, ub),
                        x_scale="jac", max_nfev=max_nfev, verbose=2)
    print(f"{time.perf_counter() - t0:.0f} s")
    fitted = {k: round(float(v), 4) for k, v in zip(names_, res.x, strict=True)}
    print(f"rms residual {np.sqrt(np.mean(resid_many(x0) ** 2)):.3f} (car {base!r}) -> "
          f"{np.sqrt(np.mean(res.fun ** 2)):.3f} (fitted)")
    print(fitted)
    return fitted


def grid_dynamics(grid: str, traces: str | None = None, turn_speed_weight: float = 0.5,
                  base: str = "tyre", protocols_prefix: str = "", top: int = 8,
                  batch: int = 8) -> list[tuple]:
    """The fit's residual (:func:`fit_dynamics`) over every combination of ``grid``
    ("field=v1,v2,...;field2=..."), for fields where least squares stalls (the piecewise
    terms of Dynamics.speed_brake_*: a kink where the slip crosses its threshold). Prints the
    ``top`` best sets and the base car's residual; returns [(rms, {field: value}), ...] best
    first. ``protocols_prefix``: the residual of those protocols only (e.g. "lock")."""
    import itertools

    import numpy as np

    axes = {}
    for part in filter(None, (x.strip() for x in grid.split(";"))):
        field, _, values = part.partition("=")
        if not values:
            raise SystemExit(f"--grid: {part!r} is not field=v1,v2,...")
        axes[field.strip()] = [float(v) for v in values.split(",")]
    names_, resid_many, x0, _, _ = _fit_problem(traces, ",".join(axes), turn_speed_weight,
                                                base, protocols_prefix)
    sets = np.array(list(itertools.product(*axes.values())), np.float64)
    rms = np.concatenate([np.sqrt(np.mean(resid_many(sets[i:i + batch]) ** 2, axis=1))
                          for i in range(0, len(sets), batch)])
    order = np.argsort(rms)
    out = [(float(rms[i]), dict(zip(names_, map(float, sets[i]), strict=True)))
           for i in order]
    print(f"rms residual of car {base!r}: {np.sqrt(np.mean(resid_many(x0) ** 2)):.5f}")
    for r, d in out[:top]:
        print(f"{r:.5f}  {d}")
    return out


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
    ap.add_argument("--traces", default=None,
                    help="with --fit or --grid: an .npz cache of the PyBullet traces (read "
                         "if it exists, else written), so a refit does not rerun PyBullet")
    ap.add_argument("--max-nfev", type=int, default=300, help="with --fit: evaluations")
    ap.add_argument("--fields", default="cornering",
                    help="with --fit: 'cornering' (default), 'straight', 'all' or a "
                         "comma-separated list of Dynamics fields")
    ap.add_argument("--turn-speed-weight", type=float, default=0.5,
                    help="with --fit or --grid: weight of a turning run's speed residual "
                         "(m/s) next to its yaw rate's (rad/s, 1)")
    ap.add_argument("--car", default="tyre",
                    help="with --fit or --grid: the car (rl.envs.jax_env.CARS) to start from")
    ap.add_argument("--protocols", default="",
                    help="with --grid: only the fit protocols whose names start with this")
    ap.add_argument("--grid", default=None,
                    help="the fit's residual over a grid, 'field=v1,v2;field2=...' (the best "
                         "sets), and exit")
    args = ap.parse_args(argv)
    if args.grid:
        grid_dynamics(args.grid, args.traces, args.turn_speed_weight, args.car,
                      args.protocols)
        return
    if args.fit:
        fit_dynamics(args.max_nfev, args.traces, args.fields, args.turn_speed_weight, args.car)
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
