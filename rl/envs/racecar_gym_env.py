"""racecar_gym itself (axelbr/racecar_gym), when it is importable — optional, driven headless.

racecar_gym is not on PyPI, pins numpy 1.22 (no wheels for Python ≥ 3.11) and downloads its
tracks from GitHub on first use, so raceformer does not depend on it; :mod:`rl.envs.bullet`
is the network-free stand-in with the same interface. Where you do have it::

    # an optional "racecar-gym" extra cannot be declared in pyproject.toml (no PyPI release);
    # install it by hand into the project's environment instead:
    git clone https://github.com/axelbr/racecar_gym.git
    uv pip install --no-deps -e racecar_gym          # its numpy pin does not resolve on 3.11+
    uv pip install yamldataclassconfig nptyping pettingzoo
    # tracks: unzip racecar_gym's release all.zip (or ../shared/data/racecar_tracks/*.zip)
    # into racecar_gym/models/scenes/ so that nothing is downloaded at run time.
    # racecar_gym uses ``np.float`` / ``np.int`` (removed in numpy 1.24): on a newer numpy,
    # patch those aliases (sed -i 's/np\\.float\\b/float/; s/np\\.int\\b/int/') in
    # racecar_gym/bullet/sensors.py and racecar_gym/bullet/util.py.

Then ``make_racecar_gym_env("austria")`` returns its ``SingleAgentRaceEnv`` (render mode
``rgb_array_follow``, so no GUI window is opened — DIRECT physics) wrapped to raceformer's
conventions: the same observation keys as rl.envs.spec (``time`` as (1,) float32, the other
arrays float32), and the time limit reported as truncation rather than termination.
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
    "racecar_gym is not installed (it is not on PyPI). See the docstring of "
    "rl/envs/racecar_gym_env.py for how to install it by hand, or use the network-free "
    "PyBullet backend rl.envs.bullet.BulletRacecarEnv, which has the same interface."
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
        obs, info = self.env.reset(**kwargs)
        return self._obs(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        timed_out = float(info.get("time", 0.0)) > self.task.time_limit
        finished = int(info.get("lap", 0)) > self.task.laps
        crashed = self.task.terminate_on_collision and bool(info.get("wall_collision", False))
        if terminated and timed_out and not (finished or crashed):
            terminated, truncated = False, True
        return self._obs(obs), reward, terminated, truncated, info


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
