"""Evaluate a racing policy in the protocol of Brunnbauer et al. (ICRA 2022, racecar_gym).

    python -m rl.evaluate --ckpt runs/<run>/ckpt --tracks austria,berlin,montreal,torino \
        [--backend jax|bullet|racecar_gym] [--episodes 10] [--time-limit 160] [--out DIR]
    python -m rl.evaluate --scripted --backend bullet --tracks austria --time-limit 160

Protocol: grid start, the deterministic policy (the Gaussian mean clipped to [-1, 1]), the
training config's observation featurization, ``obs_rms`` normalization, action repeat and
(JAX backend) lidar rays, ``--episodes`` episodes per track, a time limit (default: the
training config's) and an effectively unbounded lap count, so an episode runs to the time
limit unless a wall contact ends it. ``--collision both`` (the default) runs the protocol
twice: ``terminate`` (a wall contact ends the episode, racecar_gym's
``terminate_on_collision`` and our training default) and ``continue`` (the car keeps driving
after contacts, so collisions per km and laps within the time limit are both meaningful);
``--collision config`` runs only the training config's rule, ``terminate`` / ``continue``
only that one. Collisions are reported in both.

Robustness without retraining (:class:`Perturbation`): ``--lidar-noise K`` (× the lidar's
±3 % noise), ``--lidar-drop P`` (a fraction of the rays return nothing) — the JAX simulator's
sensor, so the JAX backend only — and ``--imu-absent`` (no velocity/acceleration reaches the
policy: the multimodal policy's imu modality is absent, the lidar MLP's velocity inputs sit at
their training mean).

Metrics per episode, per track and overall (metrics.json):

* ``laps`` — progress in laps within the time limit: lap + progress − 1 at the end (negative
  or fractional values mean what they say; the racecar_gym definition, as in training logs),
* ``lap_times`` — each completed lap's duration: the difference of successive start-line
  crossing times (a car that starts on lap 1 starts its first lap at t = 0, standing start
  included; a car spawned behind the line starts lap 1 at its first crossing),
* ``collisions_per_km`` — wall-contact events (rising edges of ``wall_collision`` at the
  100 Hz physics rate) per km driven (pooled over episodes in aggregates),
  and ``collisions_per_km_debounced``, where a contact that follows the previous one after
  less than ``DEBOUNCE_S`` = 0.5 s without contact is the same event (in the JAX backend a
  car pinned against a wall flickers in and out of contact, every flicker a rising edge),
* ``collision_free_fraction`` — episodes without a wall contact,
* ``mean_speed`` — metres driven / seconds driven.

Seeds. A deterministic policy from the grid start is deterministic in the JAX backend up to
the lidar's ±3 % noise, so the episodes differ only through the noise seed: episode ``i`` is
seeded with ``--seed + i`` (the JAX key / ``env.reset(seed=…)`` of the host backends). In the
PyBullet backend the same seed gives the same episode too; one environment serves all
episodes, its reset being complete. racecar_gym's reset is not (it moves the car and nothing
else) and its sensor noise comes from the global ``np.random``, so there each episode gets a
fresh environment, with ``np.random`` and ``random`` seeded ``--seed + i`` before it is made.

Grid start. Every backend starts from racecar_gym's AutomaticGridStrategy pose
(:func:`rl.envs.spec.grid_pose`; Austria: x = 0.5, y = 0.1, facing +x, just past the start
line). A freshly made racecar_gym env — each of its episodes here — places the car 0.2 m
further ahead (x = 0.7 on Austria: ``loadURDF`` puts the chassis link frame, not the centre
of mass, at the pose): about 0.002 laps on Austria.

Position, distance and speed come from each step's ``info`` (the simulator's true pose and
velocity), not from the observation (in racecar_gym, noisy and one step stale).

Any backend, any policy. :func:`evaluate_policy` accepts any callable ``obs -> action`` (one
observation dict, no batch axis; the action a [motor, steering] array or a dict of them), so
a policy trained in the JAX backend runs in PyBullet or racecar_gym and vice versa (zero-shot
transfer between simulators), and so do the scripted drivers of :mod:`rl.drivers`
(``--scripted``).
The JAX backend runs all episodes of a track as one jitted, vmapped ``lax.scan`` (policy steps
outside, the action repeat's physics steps inside, every physics step recorded); a policy that
cannot be traced (numpy code) falls back to a host loop over the same simulator. The host
backends run a Python loop.

Writes ``metrics.json`` and PNGs (:mod:`rl.plots`) into ``--out`` (default
``runs/<run>/eval``): per track and protocol the trajectories coloured by speed over the track
map, and the run's learning curves from ``runs/<run>/metrics.jsonl`` when present.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etl import configlib
from rl import factory
from rl.agent import VELOCITY_COMPONENTS
from rl.config import RLConfig
from rl.drivers import scripted_policy
from rl.envs import spec
from rl.envs.jax_env import JaxRacecarEnv, SensorConfig, make_params
from rl.envs.spec import TaskConfig
from rl.envs.wrappers import ObsHistory
from rl.fmt import num, pm
from rl.plots import plot_learning_curves, plot_trajectories
from rl.tracks import Track, TrackError, load_track
from train.checkpoint import CheckpointError

BIG_LAPS = 100_000  # "laps = a large number": only the time limit (or a collision) ends it
DEFAULT_TRACKS = "austria,berlin,montreal,torino"
PHYSICS_DT = spec.PHYSICS_DT  # s
DEBOUNCE_S = 0.5  # contacts closer than this (contact-free time) also count as one event
TRACE_KEYS = ("time", "x", "y", "speed", "lap", "total", "collision")


@dataclass(frozen=True)
class Perturbation:
    """Sensor faults the policy never trained with (robustness without retraining).

    * ``lidar_noise`` — × the lidar's noise amplitude: each ray reads the true distance ×
      U(1 ± k·0.03) (:data:`rl.envs.spec.LIDAR_NOISE`; 1 = the sensor as trained, 0 = exact),
    * ``lidar_drop`` — the probability that a ray returns nothing (reads max range), drawn
      per ray and scan,
    * ``imu_absent`` — the IMU is missing: the multimodal policy's observation has no
      velocity and acceleration, so the adapter marks the imu modality absent (present 0,
      masked, as the ETL marks a missing sensor); the lidar MLP, which has no notion of an
      absent input, gets its velocity inputs at their training mean (0 after normalisation).

    The lidar faults are the JAX simulator's sensor settings (``SensorConfig``), so they
    need the JAX backend; the IMU fault is applied to the policy's input, in any backend."""

    lidar_noise: float = 1.0
    lidar_drop: float = 0.0
    imu_absent: bool = False

    def __post_init__(self):
        configlib.check_range("--lidar-noise", self.lidar_noise, 0.0, 100.0)
        configlib.check_range("--lidar-drop", self.lidar_drop, 0.0, 1.0, hi_open=True)

    @property
    def name(self) -> str:
        """``nominal``, or the faults joined by ``+``: ``lidar_noise_x2``, ``lidar_drop_10``
        (per cent), ``imu_absent``."""
        parts = []
        if self.lidar_noise != 1.0:
            parts.append(f"lidar_noise_x{self.lidar_noise:g}")
        if self.lidar_drop:
            parts.append(f"lidar_drop_{self.lidar_drop * 100:g}")
        if self.imu_absent:
            parts.append("imu_absent")
        return "+".join(parts) or "nominal"

    def sensors(self) -> dict[str, float]:
        """The JAX simulator's :class:`SensorConfig` fields this perturbation changes."""
        out = {}
        if self.lidar_noise != 1.0:
            out["lidar_noise"] = spec.LIDAR_NOISE * self.lidar_noise
        if self.lidar_drop:
            out["lidar_dropout"] = self.lidar_drop
        return out


def log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


# =========================================================================== metric arithmetic
def rising_edges(flags: Sequence[bool] | np.ndarray, min_gap: int = 1) -> int:
    """Number of False→True transitions (a trace that starts True counts one).

    ``min_gap`` > 1 debounces: a contact that follows the previous one after fewer than
    ``min_gap`` contact-free steps is the same event (a car pinned against a wall in the JAX
    backend flickers in and out of contact, its pose rolled back every other step)."""
    f = np.asarray(flags, bool).reshape(-1)
    if f.size == 0:
        return 0
    starts = np.nonzero(f & ~np.r_[False, f[:-1]])[0]
    if min_gap <= 1 or len(starts) < 2:
        return len(starts)
    ends = np.nonzero(f & ~np.r_[f[1:], False])[0]  # last contact step of each run
    gaps = starts[1:] - ends[:-1] - 1  # contact-free steps before each later run
    return 1 + int(np.sum(gaps >= min_gap))


def crossing_times(lap: np.ndarray, t: np.ndarray) -> dict[int, float]:
    """Start time of each lap number: the first time the lap counter reaches a new maximum.

    ``lap[0]`` is the counter after reset; a car already on lap ≥ 1 starts that lap at
    ``t[0]``. A counter that drops (driving back over the line) and rises again does not
    restart a lap: only new maxima count."""
    lap = np.asarray(lap).astype(np.int64).reshape(-1)
    t = np.asarray(t, np.float64).reshape(-1)
    out: dict[int, float] = {}
    if lap.size == 0:
        return out
    if lap[0] >= 1:
        out[int(lap[0])] = float(t[0])
    best = lap[0]
    for i in np.nonzero(np.diff(lap) > 0)[0] + 1:
        if lap[i] > best:
            for k in range(best + 1, lap[i] + 1):
                if k >= 1:
                    out[int(k)] = float(t[i])
            best = lap[i]
    return out


def lap_times(lap: np.ndarray, t: np.ndarray) -> list[float]:
    """Durations of the completed laps: differences of successive crossing times."""
    c = crossing_times(lap, t)
    return [c[k + 1] - c[k] for k in sorted(c) if k + 1 in c]


def path_length(x: np.ndarray, y: np.ndarray) -> float:
    """Metres driven along a sampled path."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.sum(np.hypot(np.diff(x), np.diff(y))))


def collisions_per_km(contacts: float, distance_m: float) -> float:
    """Wall-contact events per km; NaN when nothing was driven (undefined, not zero)."""
    if distance_m <= 0:
        return 0.0 if contacts == 0 else float("nan")
    return float(contacts) / (distance_m / 1000.0)


def episode_metrics(trace: dict[str, np.ndarray], end: str = "") -> dict[str, Any]:
    """One episode's metrics from its physics-rate trace (index 0 = the reset state)."""
    t = np.asarray(trace["time"], np.float64)
    dist = path_length(trace["x"], trace["y"])
    duration = float(t[-1] - t[0])
    contacts = rising_edges(trace["collision"])
    debounced = rising_edges(trace["collision"], int(round(DEBOUNCE_S / PHYSICS_DT)))
    lt = lap_times(trace["lap"], t)
    speed = np.asarray(trace["speed"], np.float64)
    return {
        "laps": float(trace["total"][-1]) - 1.0,
        "completed_laps": len(lt),
        "lap_times": [round(v, 4) for v in lt],
        "best_lap_time": min(lt) if lt else None,
        "duration_s": round(duration, 4),
        "distance_m": dist,
        "contacts": contacts,
        "collision_steps": int(np.sum(np.asarray(trace["collision"], bool))),
        "collisions_per_km": collisions_per_km(contacts, dist),
        "contacts_debounced": debounced,
        "collisions_per_km_debounced": collisions_per_km(debounced, dist),
        "collision_free": contacts == 0,
        "mean_speed": dist / duration if duration > 0 else 0.0,
        "max_speed": float(speed.max()) if speed.size else 0.0,
        "end": end,
    }


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(v, np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std())


def aggregate(episodes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-track summary of episode metrics (means ± std; collisions/km pooled)."""
    laps_m, laps_s = _mean_std([e["laps"] for e in episodes])
    all_laps = [t for e in episodes for t in e["lap_times"]]
    lt_m, lt_s = _mean_std(all_laps)
    km = sum(e["distance_m"] for e in episodes) / 1000.0
    contacts = sum(e["contacts"] for e in episodes)
    n = max(len(episodes), 1)
    return {
        "episodes": len(episodes),
        "laps_mean": laps_m,
        "laps_std": laps_s,
        "laps_min": min((e["laps"] for e in episodes), default=float("nan")),
        "laps_max": max((e["laps"] for e in episodes), default=float("nan")),
        "completed_laps_mean": _mean_std([e["completed_laps"] for e in episodes])[0],
        "lap_time_mean": lt_m,
        "lap_time_std": lt_s,
        "best_lap_time": min(all_laps) if all_laps else None,
        "lap_times": all_laps,
        "contacts": contacts,
        "distance_km": km,
        "collisions_per_km": collisions_per_km(contacts, km * 1000.0),
        "collisions_per_km_debounced": collisions_per_km(
            sum(e["contacts_debounced"] for e in episodes), km * 1000.0),
        "collision_free_fraction": sum(bool(e["collision_free"]) for e in episodes) / n,
        "terminated_by_collision_fraction": sum(e["end"] == "collision" for e in episodes) / n,
        "mean_speed": _mean_std([e["mean_speed"] for e in episodes])[0],
        "duration_s_mean": _mean_std([e["duration_s"] for e in episodes])[0],
    }


def overall(per_track: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Across tracks: the mean of per-track means, collisions/km pooled over all episodes."""
    aggs = [r["aggregate"] for r in per_track.values()]
    eps = [e for r in per_track.values() for e in r["episodes"]]
    pooled = aggregate(eps) if eps else {}
    return {
        "tracks": list(per_track),
        "laps_mean_over_tracks": _mean_std([a["laps_mean"] for a in aggs])[0],
        "laps_mean": pooled.get("laps_mean"),
        "laps_std": pooled.get("laps_std"),
        "completed_laps_mean": pooled.get("completed_laps_mean"),
        "collisions_per_km": pooled.get("collisions_per_km"),
        "collisions_per_km_debounced": pooled.get("collisions_per_km_debounced"),
        "collision_free_fraction": pooled.get("collision_free_fraction"),
        "mean_speed": pooled.get("mean_speed"),
        "episodes": len(eps),
    }


# =========================================================================== policies
IMU_KEYS = ("velocity", "acceleration")  # the observation keys the IMU provides


def make_act(graphdef, featurize: Callable, *, imu_absent: bool = False,
             velocity_dims: int = 0) -> Callable:
    """``act(obs, state, obs_rms) -> action``: the deterministic policy of an agent with the
    graph ``graphdef``, as a pure function of its arrays (``state``: ``nnx.split``'s state;
    ``obs_rms``: the observation statistics or None), so one compiled rollout serves every
    checkpoint of an architecture. The observation (ONE dict) goes through the training
    featurization, gets a batch axis of one and the training normalization; the Gaussian mean
    is clipped to [-1, 1]. ``imu_absent`` (:class:`Perturbation`): the IMU's keys are dropped
    from the observation, or, for a flat-vector policy (``velocity_dims`` > 0: its last
    inputs are the velocity), those inputs are set to their normalized mean, 0."""

    def act(obs: dict, state, obs_rms):
        obs = {k: jnp.asarray(v) for k, v in obs.items()
               if not (imu_absent and not velocity_dims and k in IMU_KEYS)}
        x = jax.tree.map(lambda a: a[None], featurize(obs))
        if obs_rms is not None:
            x = obs_rms.normalize(x)
        if imu_absent and velocity_dims:
            x = x.at[..., -velocity_dims:].set(0.0)
        mean, _, _ = nnx.merge(graphdef, state)(x)
        return jnp.clip(mean[0], -1.0, 1.0)

    return act


def velocity_dims(cfg: RLConfig) -> int:
    """How many of the policy's flat inputs are the velocity (the lidar MLP's last ones)."""
    return len(VELOCITY_COMPONENTS[cfg.model.velocity]) if cfg.model.policy == "lidar_mlp" else 0


def checkpoint_policy(model, featurize: Callable, obs_rms=None, *, imu_absent: bool = False,
                      velocity_dims: int = 0) -> Callable:
    """The deterministic policy of a trained agent: one raw observation dict → clip(mean)
    (:func:`make_act` with the agent's arrays bound). Pure JAX (traceable: it runs inside the
    JAX backend's scan) and jitted on the host."""
    graphdef, state = nnx.split(model)
    act = make_act(graphdef, featurize, imu_absent=imu_absent, velocity_dims=velocity_dims)
    return jax.jit(lambda obs: act(obs, state, obs_rms))


# =========================================================================== rollouts
def _task(time_limit: float, terminate_on_collision: bool, camera: bool,
          actuator: str = "motor", car: str = "kinematic",
          speed_max: float = spec.SPEED_MAX_VELOCITY, speed_min: float = 0.0) -> TaskConfig:
    """The evaluation protocol's task: grid start, many laps, the given time limit; the
    policy's drive action goes to ``actuator`` and the JAX backend drives ``car`` (the
    training config's), its speed actuator's targets in ``speed_min`` … ``speed_max`` m/s."""
    return TaskConfig(laps=BIG_LAPS, time_limit=float(time_limit),
                      terminate_on_collision=bool(terminate_on_collision), reset_mode="grid",
                      observe_camera=bool(camera), actuator=actuator, car=car,
                      speed_max=float(speed_max), speed_min=float(speed_min))  # fmt: skip


def _episode_key(seed: int):
    """The key JaxRacecarEnv.reset(seed=seed) would use, so scan and host paths agree."""

    return jax.random.split(jax.random.PRNGKey(seed))[1]


@functools.lru_cache(maxsize=32)
def _jax_rollout(env, policy_fn: Callable, n_policy_steps: int, action_repeat: int):
    """jit(vmap(episode)) over keys: every physics step recorded, frozen once done. The
    policy is called ``policy_fn(obs, *args)`` with the rollout's ``args`` (jit arguments,
    e.g. a checkpoint's arrays: another checkpoint of the same architecture, or another track
    of the same map size, reuses the compiled rollout — hence the cache, keyed on the env,
    the policy function and the lengths)."""

    def record(st):
        return {"time": st.time, "x": st.pos[0], "y": st.pos[1], "speed": st.v,
                "lap": st.lap, "total": st.total, "collision": st.collision}  # fmt: skip

    def episode(key, params, args):
        obs, st = env.reset(key, params)

        def policy_step(carry, _):
            a = spec.action_array(policy_fn(carry[1], *args), jnp)

            def physics(c, _):
                st, obs, done = c
                o2, s2, _, te, tr, _ = env.step(st, a, params)
                keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(done, o, n), new, old)  # noqa: E731
                rec = record(s2)
                rec.update(valid=~done, terminated=te & ~done, truncated=tr & ~done)
                return (keep(s2, st), keep(o2, obs), done | te | tr), rec

            return jax.lax.scan(physics, carry, None, action_repeat)

        _, recs = jax.lax.scan(policy_step, (st, obs, jnp.bool_(False)), None, n_policy_steps)
        recs = jax.tree.map(lambda r: r.reshape(-1), recs)
        return record(st), recs

    return jax.jit(jax.vmap(episode, in_axes=(0, None, None)))


def _traces_from_jax(first: dict, recs: dict) -> list[tuple[dict, str]]:
    first = {k: np.asarray(v) for k, v in first.items()}
    recs = {k: np.asarray(v) for k, v in recs.items()}
    out = []
    for i in range(recs["valid"].shape[0]):
        m = recs["valid"][i]
        tr = {k: np.concatenate([first[k][i : i + 1], recs[k][i][m]]) for k in TRACE_KEYS}
        end = ("collision" if recs["terminated"][i].any()
               else "time_limit" if recs["truncated"][i].any() else "none")  # fmt: skip
        out.append((tr, end))
    return out


def rollout_jax(policy_fn, track, seeds, time_limit, action_repeat=1,
                terminate_on_collision=False, camera=False,
                actuator="motor", *, sensors: dict | None = None,
                policy_args: tuple = (), car: str = "kinematic",
                start: tuple[float, float, float] | None = None,
                speed_max: float = spec.SPEED_MAX_VELOCITY,
                speed_min: float = 0.0, history: bool = False) -> list[tuple[dict, str]]:
    """All episodes of one track in the JAX backend as one jitted, vmapped scan; the lidar's
    ``sensors`` settings changed where given (:meth:`Perturbation.sensors`); the policy
    called ``policy_fn(obs, *policy_args)``. ``start``: (x, y, yaw in degrees) to start every
    episode from, at rest, instead of the grid. ``history``: the observations carry the
    previous scan and action (``model.history``)."""

    env = factory.make_sim(_task(time_limit, terminate_on_collision, camera, actuator, car,
                                 speed_max, speed_min), history=history,
                           camera=camera, **(sensors or {}))
    params = make_params(track)
    if start is not None:
        x, y, yaw = start
        trk = track if isinstance(track, Track) else load_track(track)
        if not trk.value(trk.obstacle_m, x, y) > 0:
            raise ValueError(f"start ({x:g}, {y:g}) is not on the road of track {trk.name!r}")
        params = params._replace(grid_pose=jnp.asarray([x, y, math.radians(yaw)], jnp.float32))
    n_physics = int(round(time_limit / PHYSICS_DT))
    n_policy = -(-n_physics // action_repeat)
    keys = jnp.stack([_episode_key(int(s)) for s in seeds])
    fn = _jax_rollout(env, policy_fn, n_policy, action_repeat)
    first, recs = fn(keys, params, tuple(policy_args))
    return _traces_from_jax(first, recs)


def make_gym_env(backend: str, track, time_limit: float, terminate_on_collision: bool,
                 camera: bool = False, actuator: str = "motor", sensors: dict | None = None,
                 car: str = "kinematic", speed_max: float = spec.SPEED_MAX_VELOCITY,
                 speed_min: float = 0.0):
    """One raw (physics-rate) environment of a backend in the evaluation protocol's task;
    ``sensors``: the JAX simulator's changed sensor settings (JAX backend only)."""
    task = _task(time_limit, terminate_on_collision, camera, actuator, car, speed_max,
                 speed_min)
    if sensors:
        if backend != "jax":
            raise ValueError(f"lidar perturbations {sorted(sensors)}: the JAX backend's "
                             f"simulator only, not {backend!r}")
        return JaxRacecarEnv(track, task, sensors=SensorConfig(camera=camera, **sensors))
    return factory.make_env(backend, track, task, camera)


def _vector(d: dict, key: str) -> np.ndarray | None:
    v = d.get(key)
    if v is None:
        return None
    a = np.asarray(v, np.float64).reshape(-1)
    return a if a.size >= 2 else None


def _host_record(obs: dict, info: dict) -> tuple:
    """One trace row (:data:`TRACE_KEYS`) of a host env's step.

    Position and speed come from ``info``'s true state where it has it — racecar_gym's info
    carries the simulator's ``pose`` and body-frame ``velocity`` after the step, while its
    observation is the sensors' reading, with Gaussian noise and taken *before* the world
    stepped (one step stale); our PyBullet and JAX gym envs put the true pose and velocity in
    info too — and from the observation only where info lacks them."""
    pose = _vector(info, "pose")
    pose = pose if pose is not None else np.asarray(obs["pose"], np.float64).reshape(-1)
    vel = _vector(info, "velocity")
    vel = vel if vel is not None else np.asarray(obs["velocity"], np.float64).reshape(-1)
    lap = int(info.get("lap", 1))
    t = info.get("time", obs.get("time"))
    return (float(np.asarray(t).reshape(-1)[0]), pose[0], pose[1],
            math.hypot(vel[0], vel[1]), lap, lap + float(info.get("progress", 0.0)),
            bool(info.get("wall_collision", False)))  # fmt: skip


def _episode_gym(env, policy_fn, seed: int, action_repeat: int,
                 history: bool = False) -> tuple[dict, str]:
    obs, info = env.reset(seed=int(seed), options={"mode": "grid"})
    rows = [_host_record(obs, info)]
    end, done = "none", False
    # the env's own action space names its drive actuator ("motor" or "speed")
    actuator = "speed" if "speed" in env.action_space.spaces else "motor"
    past = ObsHistory() if history else None
    while not done:
        a = spec.action_array(policy_fn(obs if past is None else past.add(obs)))
        if past is not None:
            past.acted(a)
        act = spec.action_dict(a, actuator)
        for _ in range(action_repeat):
            obs, _, term, trunc, info = env.step(act)
            rows.append(_host_record(obs, info))
            if term or trunc:
                done = True
                collided = bool(info.get("wall_collision", False))
                end = "collision" if term and collided else "time_limit" if trunc else "laps"
                break
    cols = list(zip(*rows, strict=True))
    return {k: np.asarray(v) for k, v in zip(TRACE_KEYS, cols, strict=True)}, end


def rollout_gym(env, policy_fn, seeds, action_repeat=1, *,
                fresh: bool = False, history: bool = False) -> list[tuple[dict, str]]:
    """Episodes of a gymnasium env (physics rate, one step per call) in a Python loop, the
    action held for ``action_repeat`` physics steps; every physics step recorded.

    ``env`` is an environment, reset for every episode (our backends' reset is complete), or,
    with ``fresh=True``, a callable making one: each episode then gets a new environment,
    closed after it, and the global numpy and ``random`` generators are seeded with the
    episode's seed first. That is racecar_gym's case: its reset only moves the car (wheel
    spin and sensor state carry over, and the first episode of an env starts 0.2 m ahead of
    later ones), and its sensor noise is drawn from the global ``np.random``, which
    ``reset(seed=…)`` does not seed — a fresh, seeded env makes an episode reproducible.
    ``history``: the policy's observations carry ``model.history``'s previous scan and
    action (:class:`rl.envs.wrappers.ObsHistory`)."""
    out = []
    for s in seeds:
        if not fresh:
            out.append(_episode_gym(env, policy_fn, s, action_repeat, history))
            continue
        np.random.seed(int(s))  # noqa: NPY002 - racecar_gym draws its noise from it
        random.seed(int(s))
        e = env()
        try:
            out.append(_episode_gym(e, policy_fn, s, action_repeat, history))
        finally:
            e.close()
    return out


def evaluate_policy(policy_fn: Callable, track, backend: str = "jax", episodes: int = 10,
                    time_limit: float = 60.0, seed: int = 0, *, action_repeat: int = 1,
                    terminate_on_collision: bool = False, camera: bool = False,
                    rollout: str = "auto", actuator: str = "motor",
                    sensors: dict | None = None, policy_args: tuple = (),
                    car: str = "kinematic",
                    start: tuple[float, float, float] | None = None,
                    speed_max: float = spec.SPEED_MAX_VELOCITY,
                    speed_min: float = 0.0, history: bool = False) -> dict[str, Any]:
    """Run ``episodes`` grid-start episodes of ``policy_fn`` (one obs dict → action) on
    ``track`` (a name, path, ``procedural:<seed>`` or :class:`rl.tracks.Track`).

    Episode ``i`` is seeded ``seed + i``. ``rollout``: ``"scan"`` (JAX backend only: one
    jitted scan; the policy must be traceable), ``"host"`` (a Python loop) or ``"auto"``
    (scan for the JAX backend, falling back to the host loop for an untraceable policy).
    ``sensors``: the JAX simulator's lidar settings a :class:`Perturbation` changes (JAX
    backend only). ``policy_args``: the policy is called ``policy_fn(obs, *policy_args)``
    (:func:`make_act`'s checkpoint arrays; they are jit arguments of the scan). ``start``:
    (x, y, yaw°) instead of the grid (JAX backend's scan only; :func:`rollout_jax`).
    ``history``: the policy's observations carry the previous policy step's scan and action
    (``model.history``; one policy step per lidar period, as the policy trained).
    Returns ``{"track", "backend", "episodes": [metrics…], "aggregate": {…},
    "traces": [{time, x, y, speed, lap, total, collision} arrays…]}``."""
    if sensors and backend != "jax":
        raise ValueError(f"lidar perturbations {sorted(sensors)}: the JAX backend's simulator "
                         f"only, not {backend!r}")
    if history and action_repeat != spec.LIDAR_PERIOD:
        raise ValueError(f"model.history: action repeat {action_repeat}, not the lidar's "
                         f"period {spec.LIDAR_PERIOD} the policy was trained with")
    if start is not None and (backend != "jax" or rollout == "host"):
        raise ValueError(f"a start pose: the JAX backend's scan only, not {backend!r} "
                         f"({rollout} rollout)")
    trk = track if isinstance(track, Track) else load_track(track)
    seeds = [seed + i for i in range(episodes)]
    t0 = time.perf_counter()
    results = None
    if backend == "jax" and rollout in ("auto", "scan"):
        try:
            results = rollout_jax(policy_fn, trk, seeds, time_limit, action_repeat,
                                  terminate_on_collision, camera, actuator, sensors=sensors,
                                  policy_args=policy_args, car=car, start=start,
                                  speed_max=speed_max, speed_min=speed_min,
                                  history=history)  # fmt: skip
            used = "scan"
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                jax.errors.TracerIntegerConversionError, TypeError) as e:  # fmt: skip
            if rollout == "scan" or start is not None:
                raise
            log(f"policy is not traceable ({type(e).__name__}); host loop instead")
    if results is None:
        if policy_args:  # the host loop calls the policy with an observation alone
            jitted = jax.jit(policy_fn)
            policy_fn = lambda obs: jitted(obs, *policy_args)  # noqa: E731

        def make():
            return make_gym_env(backend, trk if backend != "racecar_gym" else track, time_limit,
                                terminate_on_collision, camera, actuator, sensors,
                                car, speed_max, speed_min)  # fmt: skip

        if backend == "racecar_gym":  # a fresh, seeded env per episode (see rollout_gym)
            results = rollout_gym(make, policy_fn, seeds, action_repeat, fresh=True,
                                  history=history)
        else:
            env = make()
            try:
                results = rollout_gym(env, policy_fn, seeds, action_repeat, history=history)
            finally:
                env.close()
        used = "host"
    eps = [episode_metrics(tr, end) for tr, end in results]
    for s, e in zip(seeds, eps, strict=True):
        e["seed"] = s
    return {
        "track": trk.name if not isinstance(track, str) else track,
        "backend": backend,
        "lap_length_m": trk.lap_length_m,
        "rollout": used,
        "wall_s": time.perf_counter() - t0,
        "episodes": eps,
        "aggregate": aggregate(eps),
        "traces": [tr for tr, _ in results],
    }


# =========================================================================== CLI
def summary_line(res: dict[str, Any]) -> str:
    """One track's result as a log line; what is undefined (no lap completed: no lap time,
    nothing driven: no collisions per km) reads "—", not "nan" or "None"."""
    a = res["aggregate"]
    return (f"  laps {pm(a['laps_mean'], a['laps_std'], '.2f')}, "
            f"lap time {num(a['lap_time_mean'], '.2f', ' s')} "
            f"(best {num(a['best_lap_time'], '.2f', ' s')}), "
            f"{num(a['collisions_per_km'], '.2f')} collisions/km "
            f"({num(a['collisions_per_km_debounced'], '.2f')} debounced), "
            f"collision-free {num(a['collision_free_fraction'], '.0%')}, "
            f"{num(a['mean_speed'], '.2f', ' m/s')}  "
            f"[{res['wall_s']:.0f} s, {res['rollout']}]")  # fmt: skip


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_metrics(out: Path, report: dict, pngs: Sequence = ()) -> Path:
    """``out/metrics.json`` (written last: its presence means the evaluation completed)."""
    path = out / "metrics.json"
    path.write_text(json.dumps(_json_safe(report), indent=2))
    log(f"wrote {path}" + (f" and {len(pngs)} PNGs" if pngs else ""))
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name)


def _modes(choice: str, trained: bool) -> dict[str, bool]:
    if choice == "both":
        return {"terminate": True, "continue": False}
    if choice == "config":
        return {"terminate" if trained else "continue": trained}
    return {choice: choice == "terminate"}


def main(argv: list[str] | None = None) -> int:
    """The command line; a missing or broken track is one line on stderr, exit code 2."""
    try:
        return _main(argv)
    except TrackError as e:
        print(f"rl.evaluate: error: {e}", file=sys.stderr)
        return 2


class PolicyCache:
    """What evaluating many checkpoints can share: one policy function per architecture (so
    the compiled rollouts of :func:`_jax_rollout` serve every checkpoint of it) and the last
    checkpoint restored (its evaluations under several conditions restore it once)."""

    def __init__(self):
        self.acts: dict = {}
        self.last: tuple | None = None  # ((ckpt, step), (cfg, model, obs_rms))
        self.step: int | None = None  # the step the last restore read

    def restore(self, ckpt: str | Path, step: int | None):
        """Without ``step``, the newest intact step (factory.restore_policy_step); the step
        read is ``self.step``."""
        key = (str(Path(ckpt).resolve()), step)
        if self.last is None or self.last[0] != key:
            cfg, model, obs_rms, used = factory.restore_policy_step(ckpt, step)
            self.last, self.step = (key, (cfg, model, obs_rms)), used
        return self.last[1]


def load_checkpoint_policy(ckpt: str | Path, step: int | None = None, *,
                           imu_absent: bool = False, cache: PolicyCache | None = None):
    """(config, policy_fn, policy_args) of a PPO checkpoint: ``policy_fn(obs, *policy_args)``
    is its deterministic policy (:func:`make_act`), ``policy_args`` its arrays. ``cache``
    (:class:`PolicyCache`): share policy functions, and the restored checkpoint, between
    calls."""
    cache = cache or PolicyCache()
    cfg, model, obs_rms = cache.restore(ckpt, step)
    graphdef, state = nnx.split(model)
    ft = cfg.finetune
    key = (graphdef, json.dumps(configlib.to_dict(cfg.model), sort_keys=True),
           cfg.env.world_scale, ft.pretrained_ckpt, ft.pretrain_config, ft.absent, imu_absent)
    if key not in cache.acts:
        _, featurize, _ = factory.make_agent(cfg)
        cache.acts[key] = make_act(graphdef, featurize, imu_absent=imu_absent,
                                   velocity_dims=velocity_dims(cfg))
    return cfg, cache.acts[key], (state, obs_rms)


def run_protocol(policy, tracks: Sequence[str], *, backend: str, episodes: int,
                 time_limit: float, seed: int, modes: dict[str, bool], action_repeat: int,
                 camera: bool, actuator: str, perturbation: Perturbation | None = None,
                 policy_args: tuple = (), out: Path | None = None,
                 line_driver: bool = False, sensors: dict | None = None,
                 car: str = "kinematic",
                 start: tuple[float, float, float] | None = None,
                 speed_max: float = spec.SPEED_MAX_VELOCITY, speed_min: float = 0.0,
                 history: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Every collision mode × track of the protocol: ``(results, pngs)``, ``results[mode] =
    {"tracks": {name: result}, "overall": …}``; trajectory PNGs into ``out`` (None: none).
    ``line_driver``: the policy is rl.plan's line follower, made per track. ``sensors``: JAX
    simulator sensor settings (the training config's rays), the perturbation's on top.
    ``history``: the policy reads the previous scan and action (``model.history``)."""
    sensors = {**(sensors or {}), **(perturbation or Perturbation()).sensors()}
    results: dict[str, Any] = {}
    pngs: list[str] = []
    for mode, term in modes.items():
        per_track = {}
        for name in tracks:
            trk = load_track(name)
            if line_driver:
                policy = scripted_policy("line", trk)
            log(f"{name} ({trk.lap_length_m:.0f} m), {backend}, {mode}: "
                f"{episodes} × {time_limit:.0f} s …")  # fmt: skip
            res = evaluate_policy(policy, name if backend == "racecar_gym" else trk, backend,
                                  episodes, time_limit, seed, action_repeat=action_repeat,
                                  terminate_on_collision=term, camera=camera,
                                  actuator=actuator, sensors=sensors,
                                  policy_args=policy_args, car=car, start=start,
                                  speed_max=speed_max, speed_min=speed_min,
                                  history=history)  # fmt: skip
            log(summary_line(res))
            if out is not None:
                pngs.append(str(plot_trajectories(
                    trk, res, out / f"traj_{_slug(name)}_{backend}_{mode}.png")))
            res.pop("traces")
            per_track[name] = res
        results[mode] = {"tracks": per_track, "overall": overall(per_track)}
    return results, pngs


def _protocol_record(cfg: RLConfig, episodes: int, time_limit: float, seed: int,
                     modes: dict[str, bool], repeat: int,
                     perturbation: Perturbation,
                     start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    return {
        "episodes": episodes, "time_limit_s": time_limit, "laps": BIG_LAPS,
        "start": "grid" if start is None else dict(zip(("x", "y", "yaw_deg"), start,
                                                       strict=True)),
        "action": "deterministic: clip(Gaussian mean, -1, 1)",
        "actuator": cfg.env.actuator, "car": cfg.env.car, "speed_max": cfg.env.speed_max,
        "speed_min": cfg.env.speed_min,
        "action_repeat": repeat, "seeds": [seed + i for i in range(episodes)],
        "seed_note": "episode i uses seed + i; with a deterministic policy and the grid "
                     "start, episodes differ only through the lidar noise",
        "collision_modes": {m: {"terminate_on_collision": v} for m, v in modes.items()},
        "trained_terminate_on_collision": cfg.env.terminate_on_collision,
        "perturbation": {"name": perturbation.name, "lidar_noise": perturbation.lidar_noise,
                         "lidar_drop": perturbation.lidar_drop,
                         "imu_absent": perturbation.imu_absent},
    }  # fmt: skip


def evaluate_checkpoint(ckpt: str | Path, tracks: Sequence[str], out: str | Path, *,
                        step: int | None = None, backend: str | None = None,
                        episodes: int = 10, time_limit: float | None = None, seed: int = 0,
                        collision: str = "both", action_repeat: int | None = None,
                        perturbation: Perturbation | None = None, plots: bool = True,
                        cache: PolicyCache | None = None, command: str = "",
                        start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """The protocol for one PPO checkpoint (default: its latest step) on ``tracks``; writes
    ``out/metrics.json`` (last: its presence means the evaluation completed) and, with
    ``plots``, the PNGs; returns the report. ``cache``: see :class:`PolicyCache`."""
    ckpt, out = Path(ckpt), Path(out)
    perturbation = perturbation or Perturbation()
    cache = cache or PolicyCache()
    cfg, policy, args = load_checkpoint_policy(ckpt, step, imu_absent=perturbation.imu_absent,
                                               cache=cache)
    step = cache.step  # without a step: the newest intact one
    backend = backend or cfg.env.backend
    # the JAX simulator casts the rays the policy trained with (a multimodal policy's BEV
    # from 540 rays is not the BEV from 1080); the other backends cast racecar_gym's scan
    sensors = ({"lidar_rays": cfg.env.lidar_rays}
               if backend == "jax" and cfg.env.lidar_rays != spec.LIDAR_RAYS else {})
    repeat = action_repeat or cfg.env.action_repeat
    time_limit = time_limit if time_limit is not None else cfg.env.time_limit
    modes = _modes(collision, cfg.env.terminate_on_collision)
    out.mkdir(parents=True, exist_ok=True)
    results, pngs = run_protocol(policy, tracks, backend=backend, episodes=episodes,
                                 time_limit=time_limit, seed=seed, modes=modes,
                                 action_repeat=repeat, camera=cfg.env.camera,
                                 actuator=cfg.env.actuator, car=cfg.env.car,
                                 speed_max=cfg.env.speed_max, speed_min=cfg.env.speed_min,
                                 perturbation=perturbation,
                                 policy_args=args, out=out if plots else None,
                                 sensors=sensors, start=start,
                                 history=cfg.model.history)  # fmt: skip
    run_dir = ckpt.parent
    if plots and (run_dir / "metrics.jsonl").exists():
        p = plot_learning_curves(run_dir / "metrics.jsonl", out / "learning_curves.png")
        if p is not None:
            pngs.append(str(p))
    report = {
        "command": command, "backend": backend, "checkpoint": str(ckpt),
        "checkpoint_step": step, "run": cfg.run_name, "policy": cfg.model.policy,
        "trained_backend": cfg.env.backend, "trained_track": cfg.env.track,
        "sensors": sensors,
        "protocol": _protocol_record(cfg, episodes, time_limit, seed, modes, repeat,
                                     perturbation, start),
        "results": results, "plots": pngs,
    }  # fmt: skip
    write_metrics(out, report, pngs)
    return report


def _pose(text: str) -> tuple[float, float, float]:
    """``X,Y,YAW`` (m, m, degrees) of ``--start``."""
    try:
        x, y, yaw = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: three numbers X,Y,YAW (m, m, degrees)") from None
    return x, y, yaw


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="runs/<run>/ckpt of a PPO run")
    src.add_argument("--scripted", action="store_true", help="the backend's gap follower")
    ap.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    ap.add_argument("--tracks", default=DEFAULT_TRACKS, help="comma-separated track names")
    ap.add_argument("--backend", choices=("jax", "bullet", "racecar_gym"),
                    help="default: the training config's (jax for --scripted)")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--time-limit", type=float, help="seconds (default: the training config's)")
    ap.add_argument("--collision", default="both",
                    choices=("both", "config", "terminate", "continue"),
                    help="terminate episodes on a wall contact, or not, or both protocols")
    ap.add_argument("--action-repeat", type=int,
                    help="physics steps per action (default: training config's; scripted 1)")
    ap.add_argument("--driver", choices=("jax", "bullet", "line"),
                    help="--scripted: whose gap follower (default: the backend's), or 'line': "
                         "follow the clean lap rl.plan finds for each track")
    ap.add_argument("--seed", type=int, default=0, help="episode i uses seed + i")
    ap.add_argument("--lidar-noise", type=float, default=1.0, metavar="K",
                    help="robustness: × the lidar's noise amplitude (±3 %%; JAX backend)")
    ap.add_argument("--lidar-drop", type=float, default=0.0, metavar="P",
                    help="robustness: fraction of rays that return nothing (JAX backend)")
    ap.add_argument("--imu-absent", action="store_true",
                    help="robustness: no IMU (velocity, acceleration) reaches the policy")
    ap.add_argument("--start", type=_pose, metavar="X,Y,YAW",
                    help="start every episode at rest from this pose (m, m, degrees) instead "
                         "of the grid (JAX backend): how a policy handles one place of a "
                         "track; negative numbers: --start=-0.5,-7.5,90")
    ap.add_argument("--out", help="output folder (default runs/<run>/eval)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    command = "python -m rl.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    tracks = [t.strip() for t in args.tracks.split(",") if t.strip()]
    try:
        perturbation = Perturbation(args.lidar_noise, args.lidar_drop, args.imu_absent)
    except configlib.ConfigError as e:
        return configlib.cli_error("rl.evaluate", e)

    try:
        if not args.scripted:
            ckpt = Path(args.ckpt)
            out = Path(args.out) if args.out else ckpt.parent / "eval"
            evaluate_checkpoint(ckpt, tracks, out, step=args.step, backend=args.backend,
                                episodes=args.episodes, time_limit=args.time_limit,
                                seed=args.seed, collision=args.collision,
                                action_repeat=args.action_repeat, perturbation=perturbation,
                                plots=not args.no_plots, command=command,
                                start=args.start)  # fmt: skip
            return 0
        if perturbation.imu_absent:
            print("rl.evaluate: --imu-absent: a trained policy's input (--ckpt), not a "
                  "scripted driver's", file=sys.stderr)
            return 2
        return _scripted(args, tracks, perturbation, command)
    except ImportError as e:
        print(f"rl.evaluate: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as e:
        print(f"rl.evaluate: error: {e}", file=sys.stderr)
        return 1
    except configlib.ConfigError as e:
        return configlib.cli_error("rl.evaluate", e)
    except ValueError as e:  # a perturbation the backend cannot apply
        print(f"rl.evaluate: error: {e}", file=sys.stderr)
        return 2


def _scripted(args, tracks: list[str], perturbation: Perturbation, command: str) -> int:
    cfg = RLConfig()
    backend = args.backend or "jax"
    driver = args.driver or ("jax" if backend == "jax" else "bullet")
    policy = None if driver == "line" else scripted_policy(driver)
    repeat = args.action_repeat or 1
    out = Path(args.out or f"runs/scripted_{driver}/eval_{backend}")
    time_limit = args.time_limit if args.time_limit is not None else cfg.env.time_limit
    modes = _modes(args.collision, cfg.env.terminate_on_collision)
    out.mkdir(parents=True, exist_ok=True)
    results, pngs = run_protocol(policy, tracks, backend=backend, episodes=args.episodes,
                                 time_limit=time_limit, seed=args.seed, modes=modes,
                                 action_repeat=repeat, camera=cfg.env.camera,
                                 actuator=cfg.env.actuator, car=cfg.env.car,
                                 speed_max=cfg.env.speed_max, speed_min=cfg.env.speed_min,
                                 perturbation=perturbation,
                                 out=None if args.no_plots else out,
                                 line_driver=driver == "line", start=args.start)  # fmt: skip
    report = {
        "command": command, "backend": backend,
        "policy": "scripted line follower (rl.drivers)" if driver == "line"
                  else f"scripted gap follower ({driver}, rl.drivers)",
        "checkpoint_step": None,
        "protocol": _protocol_record(cfg, args.episodes, time_limit, args.seed, modes, repeat,
                                     perturbation, args.start),
        "results": results, "plots": pngs,
    }  # fmt: skip
    write_metrics(out, report, pngs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
