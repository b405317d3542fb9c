"""The host backends' (PyBullet, racecar_gym) environment as the gymnasium runner sees it:
each action held for several physics steps, and the per-episode statistics of
:data:`rl.envs.spec.EPISODE_KEYS` in ``info`` — what the JAX backend's functional env
(rl/envs/functional.py) reports, with the same meaning."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np

from rl.envs import spec
from rl.envs.jax_env import history_spaces


class ActionRepeat(gym.Wrapper):
    """Repeat each action ``k`` physics steps (stopping at the end of an episode), sum the
    rewards, and add :data:`rl.envs.spec.EPISODE_KEYS` to ``info``: laps driven since the
    reset (lap + progress, signed), physics steps touching a wall, metres driven, seconds per
    completed lap, whether this policy step touched a wall, the wrong-way flag and the speed."""

    def __init__(self, env: gym.Env, k: int = 4):
        super().__init__(env)
        if k < 1:
            raise ValueError(f"action repeat must be ≥ 1, got {k}")
        self.k = k
        self._collisions = 0.0
        self._distance = 0.0
        self._start_total = 0.0
        self._last_xy = np.zeros(2)

    @staticmethod
    def _true(obs: dict, info: dict, key: str) -> np.ndarray:
        """The car's true ``pose``/``velocity``: from ``info`` where the backend puts it there
        (racecar_gym's observations are noisy and one step stale), else the observation."""
        return np.asarray(info[key] if key in info else obs[key], np.float64).reshape(-1)

    @staticmethod
    def _total(info: dict) -> float:
        return float(info.get("lap", 1)) + float(info.get("progress", 0.0))

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._collisions, self._distance = 0.0, 0.0
        self._start_total = self._total(info)
        self._last_xy = self._true(obs, info, "pose")[:2]
        return obs, self._augment(obs, info, hit=False)

    def _augment(self, obs: dict, info: dict, hit: bool) -> dict:
        info = dict(info)
        laps = self._total(info) - self._start_total
        done = math.floor(laps)
        t = float(np.asarray(info.get("time", obs.get("time", 0.0))).reshape(-1)[0])
        vel = self._true(obs, info, "velocity")
        info.update(
            laps=laps,
            collisions=self._collisions,
            distance=self._distance,
            lap_time=t / done if done >= 1 else float("nan"),
            wall_collision=float(hit),
            wrong_way=float(bool(info.get("wrong_way", False))),
            speed=float(math.hypot(vel[0], vel[1])),
        )
        return info

    def step(self, action):
        total, hit = 0.0, False
        for _ in range(self.k):
            obs, r, term, trunc, info = self.env.step(action)
            total += float(r)
            xy = self._true(obs, info, "pose")[:2]
            self._distance += float(np.linalg.norm(xy - self._last_xy))
            self._last_xy = xy
            contact = bool(info.get("wall_collision", False))
            self._collisions += float(contact)
            hit |= contact
            if term or trunc:
                break
        return obs, total, term, trunc, self._augment(obs, info, hit)


class ObsHistory:
    """What :attr:`rl.envs.jax_env.SensorConfig.history` adds to the JAX backend's
    observations, kept at the policy's rate for a host loop: :meth:`add` gives an observation
    with ``lidar_prev``, the scan of the observation added before it (for the first of an
    episode: its own), and ``action_prev``, the action :meth:`acted` was last told of, clipped
    to [-1, 1] (zeros until then). With one policy step per lidar period it is what the JAX
    backend gives: there the scan before the held one."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._lidar, self._action = None, np.zeros(2, np.float32)

    def add(self, obs: dict) -> dict:
        lidar = np.array(obs["lidar"], np.float32)
        out = {**obs, "lidar_prev": lidar if self._lidar is None else self._lidar,
               "action_prev": self._action}
        self._lidar = lidar
        return out

    def acted(self, action) -> None:
        self._action = np.clip(spec.action_array(action), -1.0, 1.0).reshape(2)


class History(gym.Wrapper):
    """:class:`ObsHistory` around a policy-rate environment (outside :class:`ActionRepeat`):
    the host backends' (PyBullet, racecar_gym) ``model.history`` observations."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        lidar = env.observation_space["lidar"]
        self.observation_space = gym.spaces.Dict(
            {**env.observation_space.spaces, **history_spaces(lidar.shape[-1])})
        self._history = ObsHistory()

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._history.reset()
        return self._history.add(obs), info

    def step(self, action):
        self._history.acted(action)
        obs, r, term, trunc, info = self.env.step(action)
        return self._history.add(obs), r, term, trunc, info
