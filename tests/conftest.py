"""Test-session setup shared by every test file.

JAX's persistent compilation cache is pointed at one folder for the whole session (and the
subprocesses tests start inherit it), so the same jitted program — a PPO update, an env
rollout — is compiled once per session instead of once per test. Set before JAX is imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_cache = Path(
    os.environ.get(
        "RACEFORMER_TEST_JAX_CACHE", Path(tempfile.gettempdir()) / "raceformer-jax-cache"
    )
)
_cache.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402  (after the cache setup above, which must precede JAX)


@pytest.fixture(scope="module")
def track(tmp_path_factory):
    """procedural:0, built into a private cache folder (a test file may define its own)."""
    from rl.tracks import load_track

    mp = pytest.MonkeyPatch()
    mp.setenv("RACEFORMER_CACHE", str(tmp_path_factory.mktemp("rfcache")))
    yield load_track("procedural:0")
    mp.undo()
