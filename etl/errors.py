"""Errors that carry the file and the reason, so every failure prints as one clear line."""

from __future__ import annotations


class ETLError(Exception):
    """Base: ``str(e)`` is the one line a user sees: ``<where>: <reason>``."""

    def __init__(self, where: object, reason: str):
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")


class FrameError(ETLError):
    """One frame (a PCD, an image, a bag message) is unusable; the frame is skipped and counted."""


class DriveError(ETLError):
    """A whole drive is unusable (no LiDAR, broken calibration, …); that drive fails alone."""
