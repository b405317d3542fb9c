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
def private_track_cache(tmp_path_factory):
    """RACEFORMER_CACHE pointed at a fresh folder for the module's tests (tracks they build
    land there, not in the user's cache); a module takes it with
    ``pytestmark = pytest.mark.usefixtures("private_track_cache")``."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("rfcache")
    mp.setenv("RACEFORMER_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def track(private_track_cache):
    """procedural:0, built into a private cache folder (a test file may define its own)."""
    from rl.tracks import load_track

    return load_track("procedural:0")
