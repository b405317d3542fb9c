"""racecar_gym itself (axelbr/racecar_gym), when it is importable — optional, driven headless.

racecar_gym is not on PyPI, pins numpy 1.22 and gymnasium 0.28 (no wheels for Python ≥ 3.11)
and downloads its tracks from GitHub on first use, so raceformer does not depend on it;
:mod:`rl.envs.bullet` is the network-free stand-in with the same interface. To install it
into the project's environment (an optional extra cannot be declared: no PyPI release)::

    git clone https://github.com/axelbr/racecar_gym.git    # checked: 7049676 (2023-09-18)
    uv pip install --no-deps -e racecar_gym      # editable: it reads scenarios/ and models/
                                                 # from the checkout; --no-deps: its pins
    uv pip install "yamldataclassconfig==1.5.0" "nptyping==1.4.4" "pettingzoo==1.27.0"
    python scripts/patch_racecar_gym.py racecar_gym --scenes ../shared/data/racecar_tracks

The pins: yamldataclassconfig 2.x is a rewrite racecar_gym's configs do not load with;
nptyping must be < 2 (2.x uses ``np.bool8``, gone in numpy 2); pettingzoo (imported by
``import racecar_gym``) 1.27 works with gymnasium 1.x. The project's own pins (numpy 2,
gymnasium 1, pybullet) stay. scripts/patch_racecar_gym.py makes the source edits a current
stack needs — dataclass defaults (``field(default_factory=…)``, Python 3.11), actuator
commands as Python floats (numpy 2), ``np.float``/``np.int`` annotations (numpy ≥ 1.24),
and nptyping 1.4's ``np.compat.unicode`` (numpy 2) — idempotently, failing with the file's
name if the text it expects is not there. ``--scenes`` unpacks racecar_gym's track archives
(``<name>.zip``, its release's, with ``<name>.yml`` and ``maps/maps.npz``) into
``racecar_gym/models/scenes/``; a track that is not there is downloaded from GitHub on
first use, which fails offline. (``../shared/data/racecar_tracks`` holds austria.zip; its
berlin/montreal/torino folders are mesh-only, which rl.tracks compiles but racecar_gym
cannot load.) Checked on Python 3.11.7, numpy 2.4.6, gymnasium 1.4.0, pybullet 3.2.7 with
Austria: ``rl.evaluate --backend racecar_gym`` runs.

Then ``make_racecar_gym_env("austria")`` returns its ``SingleAgentRaceEnv`` (render mode
``rgb_array_follow``, so no GUI window is opened — DIRECT physics) wrapped to raceformer's
conventions: the same observation keys as rl.envs.spec (``time`` as (1,) float32, the other
arrays float32), the time limit reported as truncation rather than termination, a copy of
the info dict (racecar_gym returns the same dict, updated in place, at every step).

What racecar_gym does that our backends do not (rl.evaluate works around the first two):

* ``reset`` only moves the car: wheel spin, the sensors' timers and the acceleration
  sensor's last velocity carry over into the next episode, and the first episode of an env
  starts 0.2 m ahead of later ones (``loadURDF`` places the chassis link frame at the grid
  pose, a later ``resetBasePositionAndOrientation`` the centre of mass).
* Sensor noise (pose, velocity, acceleration, lidar) is drawn from the global ``np.random``;
  ``reset(seed=…)`` does not seed it.
* The observation is read before the world steps, so it is one step stale; ``info`` holds
  the true state after the step (``pose``, ``velocity``, ``progress``, ``lap``, ...).
* It drives PyBullet's default client (id 0) and never disconnects; :meth:`close` of the
  wrapper does, so that the next env starts on an empty world.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import gymnasium as gym
import numpy as np
import yaml

from rl.envs import spec

INSTALL_HINT = (
    "racecar_gym is not installed or not importable (it is not on PyPI). Install it by hand: "
    "git clone https://github.com/axelbr/racecar_gym.git && "
    "uv pip install --no-deps -e racecar_gym && "
    "uv pip install yamldataclassconfig==1.5.0 nptyping==1.4.4 pettingzoo==1.27.0 && "
    "python scripts/patch_racecar_gym.py racecar_gym --scenes ../shared/data/racecar_tracks "
    "(details: the docstring of rl/envs/racecar_gym_env.py); or use the network-free PyBullet "
    "backend (rl.envs.bullet.BulletRacecarEnv), which has the same interface."
)


def racecar_gym_available() -> bool:
    try:
        import racecar_gym  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or its np.float AttributeError on numpy ≥ 1.24
        return False
    return True


class RacecarGymConventions(gym.Wrapper):
    """racecar_gym's SingleAgentRaceEnv → our conventions (keys, dtypes, truncation)."""

    def __init__(self, env: gym.Env, task: spec.TaskConfig):
        super().__init__(env)
        self.task = task
        self._connected = False  # whether our first reset connected PyBullet's client 0
        spaces = dict(env.observation_space.spaces)
        for k, s in spaces.items():
            if k == "time":
                spaces[k] = gym.spaces.Box(0.0, np.inf, (1,), np.float32)
            elif k != "rgb_camera" and isinstance(s, gym.spaces.Box):
                spaces[k] = gym.spaces.Box(
                    s.low.astype(np.float32), s.high.astype(np.float32), s.shape, np.float32
                )
        self.observation_space = gym.spaces.Dict(spaces)

    def _obs(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for k, v in obs.items():
            if k == "time":
                out[k] = np.reshape(np.asarray(v, np.float32), (1,))
            elif k == "rgb_camera":
                out[k] = np.asarray(v, np.uint8)
            else:
                out[k] = np.asarray(v, np.float32)
        return out

    def reset(self, **kwargs):
        import pybullet

        if not self._connected:  # racecar_gym's first reset connects, then uses client 0
            if pybullet.isConnected(0):
                raise RuntimeError(
                    "racecar_gym drives PyBullet's default client 0, which is already "
                    "connected in this process (another racecar_gym env not closed, or another "
                    "simulator): close it first")
            self._connected = True
        obs, info = self.env.reset(**kwargs)
        return self._obs(obs), dict(info)

    def close(self):
        """Close the env and disconnect the PyBullet client racecar_gym connected (it never
        does), so that the next racecar_gym env in this process starts on an empty world."""
        import pybullet

        try:
            super().close()
        finally:
            if self._connected and pybullet.isConnected(0):
                pybullet.disconnect(0)
            self._connected = False

    def step(self, action):
        if "speed" in action and self.task.speed_rescaled:  # the task's speed range
            c = np.clip(np.asarray(action["speed"], np.float32), -1.0, 1.0)
            action = {**action, "speed": spec.speed_command(c, self.task.speed_max,
                                                            self.task.speed_min)}
        obs, reward, terminated, truncated, info = self.env.step(action)
        timed_out = float(info.get("time", 0.0)) > self.task.time_limit
        finished = int(info.get("lap", 0)) > self.task.laps
        crashed = self.task.terminate_on_collision and bool(info.get("wall_collision", False))
        if terminated and timed_out and not (finished or crashed):
            terminated, truncated = False, True
        return self._obs(obs), reward, terminated, truncated, dict(info)


def make_racecar_gym_env(
    track: str = "austria",
    task: spec.TaskConfig | None = None,
    *,
    camera: bool = False,
    actuator: str = "motor",
    render_mode: str = "rgb_array_follow",
) -> gym.Env:
    """racecar_gym's single-agent race on ``track`` (one of its scenes, by name), headless.

    Raises ImportError with installation instructions when racecar_gym is not importable.
    """
    task = task if task is not None else spec.TaskConfig()
    if task.proximity_reward or task.stall_time:
        raise ValueError("TaskConfig.proximity_reward and stall_time are this project's "
                         "extensions; racecar_gym's maximize_progress task has neither (set "
                         "env.proximity_penalty and env.stall_time to 0)")
    try:
        import racecar_gym.envs.gym_api  # noqa: F401 - registers SingleAgentRaceEnv-v0
    except Exception as e:  # noqa: BLE001
        raise ImportError(INSTALL_HINT) from e
    if render_mode == "human":
        raise ValueError("render_mode='human' opens a GUI; this factory runs headless")
    sensors = ["pose", "velocity", "acceleration", "lidar"] + (["rgb_camera"] if camera else [])
    scenario = {
        "world": {"name": track},
        "agents": [
            {
                "id": "A",
                "vehicle": {"name": "racecar", "sensors": sensors,
                            "actuators": [actuator, "steering"]},
                "task": {
                    "task_name": "maximize_progress",
                    "params": {
                        "laps": task.laps,
                        "time_limit": task.time_limit,
                        "terminate_on_collision": task.terminate_on_collision,
                        "collision_reward": task.collision_reward,
                        "frame_reward": task.frame_reward,
                        "progress_reward": task.progress_reward,
                    },
                },
            }
        ],
    }  # fmt: skip
    fd, path = tempfile.mkstemp(suffix=".yml", prefix=f"raceformer_{track}_")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(scenario, f)
    env = gym.make("SingleAgentRaceEnv-v0", scenario=path, render_mode=render_mode)
    return RacecarGymConventions(env, task)
