"""rl.plots: the metrics.jsonl readers (the laps key's old names still plot) and the figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rl import plots


def _metrics(path: Path, laps_key: str, n: int = 6) -> Path:
    recs = [{"env_steps": 100 * i, "episode/ep_return": float(i), laps_key: 0.5 * i,
             "episode/collisions": 2} for i in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    f = path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"env_steps\": 60")  # cut off
    return f


LAPS = dict(plots.CURVES)["laps per episode"]


@pytest.mark.parametrize("key", ["episode/laps", "episode/progress", "episode/laps_driven"])
def test_read_curve_takes_the_laps_key_under_any_of_its_names(tmp_path, key):
    f = _metrics(tmp_path / key.replace("/", "_"), key)
    assert len(plots.read_metrics(f)) == 6  # the cut-off line is skipped
    x, y = plots.read_curve(f, LAPS)
    np.testing.assert_array_equal(x, 100.0 * np.arange(6))
    np.testing.assert_array_equal(y, 0.5 * np.arange(6))
    x, _ = plots.read_curve(f, "episode/ep_return")
    assert len(x) == 6
    assert len(plots.read_curve(tmp_path / "missing.jsonl", LAPS)[0]) == 0


def test_read_curve_prefers_the_new_laps_key(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(json.dumps({"env_steps": 1, "episode/laps": 2.0, "episode/progress": 9.0}))
    assert plots.read_curve(f, LAPS)[1].tolist() == [2.0]


def test_learning_curves_and_variant_curves_are_written(tmp_path):
    old = _metrics(tmp_path / "old_run", "episode/progress")
    new = _metrics(tmp_path / "new_run", "episode/laps")
    for f in (old, new):
        png = plots.plot_learning_curves(f, f.parent / "lc.png")
        assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    curves = {"a": [{label: plots.read_curve(old, keys) for label, keys in plots.CURVES}],
              "b": [{label: plots.read_curve(new, keys) for label, keys in plots.CURVES}]}
    png = plots.plot_curves(curves, tmp_path / "curves.png", "t")
    assert png is not None and png.stat().st_size > 1000
    empty = {"a": [{label: (np.zeros(0), np.zeros(0)) for label, _ in plots.CURVES}]}
    assert plots.plot_curves(empty, tmp_path / "none.png", "t") is None
