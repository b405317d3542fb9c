"""Slurm preemption: SIGTERM / SIGUSR1 set a flag; the training loop checkpoints and exits.

Shared by ``train.pretrain`` and ``rl.ppo`` (exit code 3 = saved, requeue me; see slurm/lib.sh).
"""

from __future__ import annotations

import signal


class Preemption:
    """Catch SIGTERM/SIGUSR1 for the lifetime of a run; ``signal`` is the one received."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
