"""Gymnasium wrappers shared by the host-side runner and evaluation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class ActionRepeat(gym.Wrapper):
    """Repeat each action ``k`` physics steps (stopping at the end of an episode), sum the
    rewards, and add episode-level info: ``collisions`` (physics steps touching a wall so far),
    ``distance`` (metres driven so far) and ``progress`` as laps driven (lap + progress − 1)."""

    def __init__(self, env: gym.Env, k: int = 4):
        super().__init__(env)
        if k < 1:
            raise ValueError(f"action repeat must be ≥ 1, got {k}")
        self.k = k
        self._collisions = 0.0
        self._distance = 0.0
        self._last_xy: np.ndarray | None = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._collisions, self._distance = 0.0, 0.0
        self._last_xy = np.asarray(obs["pose"][:2], np.float64)
        return obs, self._augment(info)

    def _augment(self, info: dict) -> dict:
        info = dict(info)
        if "lap" in info and "progress" in info:
            info["laps_driven"] = float(info["lap"]) + float(info["progress"]) - 1.0
        info["collisions"] = self._collisions
        info["distance"] = self._distance
        return info

    def step(self, action):
        total = 0.0
        for _ in range(self.k):
            obs, r, term, trunc, info = self.env.step(action)
            total += float(r)
            xy = np.asarray(obs["pose"][:2], np.float64)
            self._distance += float(np.linalg.norm(xy - self._last_xy))
            self._last_xy = xy
            self._collisions += float(bool(info.get("wall_collision", False)))
            if term or trunc:
                break
        return obs, total, term, trunc, self._augment(info)
