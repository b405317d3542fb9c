"""Every figure of the RL side, as PNGs: tracks, driven trajectories, planned lines and
learning curves (one run's, or several variants' over seeds), and the reader of a run's
``metrics.jsonl`` they plot from.

Figures take what they draw as arguments — arrays, :class:`rl.tracks.Track` objects, result
dicts — and this module imports nothing else from ``rl`` but :mod:`rl.fmt` (which imports
nothing), so any module (the planner's CLI, rl.evaluate, rl.compare, rl.envs.show) can draw
through it. matplotlib is imported on first use, with the Agg backend (:func:`pyplot`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rl.fmt import num, pm

# (label, metric keys, first present wins) of the learning curves. The per-episode laps were
# logged as "episode/laps_driven", then "episode/progress", now "episode/laps": old runs'
# metrics.jsonl still plot.
CURVES = (
    ("episode return", ("episode/ep_return",)),
    ("laps per episode", ("episode/laps", "episode/progress", "episode/laps_driven")),
    ("collision steps per episode", ("episode/collisions",)),
)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, dpi: int = 100) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out


# =========================================================================== metrics.jsonl
def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a line cut off by preemption is skipped)."""
    recs = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs


def read_curve(metrics_jsonl: Path, keys: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, values) of one metric in a run's metrics.jsonl: the first of ``keys`` (a
    name or names to try in order) that has a finite value; empty arrays when none has, or
    when the file does not exist."""
    metrics_jsonl = Path(metrics_jsonl)
    if not metrics_jsonl.exists():
        return np.zeros(0), np.zeros(0)
    recs = read_metrics(metrics_jsonl)
    for key in (keys,) if isinstance(keys, str) else keys:
        xs, ys = [], []
        for r in recs:
            v = r.get(key)
            if "env_steps" in r and v is not None and np.isfinite(v):
                xs.append(r["env_steps"])
                ys.append(v)
        if xs:
            break
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


# =========================================================================== tracks
def plot_track(track, out: Path, traj: np.ndarray | None = None, title: str = "") -> Path:
    """A track's drivable area and progress field side by side, the start pose, and a driven
    trajectory ((T, >= 2) world x, y) over both when given."""
    plt = pyplot()
    sl, extent = track.plot_window()
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    axes[0].imshow(track.drivable[sl], cmap="gray", extent=extent)
    axes[0].set_title(f"{track.name}: drivable area (lap ≈ {track.lap_length_m:.0f} m)")
    pm = np.where(track.drivable, track.progress, np.nan)[sl]
    im = axes[1].imshow(pm, cmap="viridis", extent=extent)
    fig.colorbar(im, ax=axes[1], fraction=0.046, label="progress")
    axes[1].set_title("progress field (norm_distance_from_start)")
    for ax in axes:
        ax.plot([0], [0], "r>", ms=10, label="start, facing +x")
        if traj is not None and len(traj):
            ax.plot(traj[:, 0], traj[:, 1], "-", color="orange", lw=1.2, label="trajectory")
        ax.set_xlabel("x [m]")
        ax.set_ylabel("y [m]")
    axes[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out, dpi=110)


def plot_plan(track, plan, out: Path, *, line: np.ndarray | None = None,
              speed: np.ndarray | None = None) -> Path:
    """A lap plan (an :class:`rl.plan.LapPlan`) over the track: for a feasible one, ``line``
    ((N, >= 2) x, y: the smoothed line) coloured by ``speed`` ((N,) its speed profile, m/s),
    both computed by the caller; for an infeasible one, where the search got stuck."""
    plt = pyplot()
    win, extent = track.plot_window()
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(track.drivable[win], cmap="gray", extent=extent, vmin=-1, vmax=1.4)
    if plan.feasible:
        if line is None or speed is None:
            plt.close(fig)
            raise ValueError("plot_plan: a feasible plan needs its line and speed profile")
        sc = ax.scatter(line[:, 0], line[:, 1], c=speed, s=2, cmap="plasma")
        fig.colorbar(sc, ax=ax, label="speed profile [m/s]")
        title = (f"{track.name}: clean lap {plan.length_m:.1f} m, turn radius "
                 f"{plan.turn_radius_m} m, min clearance {plan.min_clearance_m:.2f} m")
    else:
        ax.plot(*plan.where_stuck, "rx", ms=12)
        title = (f"{track.name}: NO clean lap at turn radius {plan.turn_radius_m} m "
                 f"(stuck at {plan.best_progress:.2f} laps, x)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    return save_figure(fig, out)


# =========================================================================== evaluation
def plot_trajectories(track, result: dict, out: Path, title: str = "") -> Path:
    """Every episode's path over the drivable area, coloured by speed (``result``: what
    :func:`rl.evaluate.evaluate_policy` returns, its traces included)."""
    from matplotlib.collections import LineCollection

    plt = pyplot()
    sl, extent = track.plot_window()
    fig, ax = plt.subplots(figsize=(9, 7.5))
    ax.imshow(track.drivable[sl], cmap="gray", extent=extent, vmin=-0.6, vmax=1.3)
    vmax = max([float(np.max(t["speed"])) for t in result["traces"] if len(t["speed"])] + [0.1])
    lc = None
    for tr in result["traces"]:
        step = max(len(tr["x"]) // 4000, 1)
        xy = np.stack([tr["x"][::step], tr["y"][::step]], 1)
        if len(xy) < 2:
            continue
        seg = np.stack([xy[:-1], xy[1:]], 1)
        lc = LineCollection(seg, cmap="plasma", linewidths=1.2, alpha=0.8)
        lc.set_array(np.asarray(tr["speed"][::step][1:], np.float64))
        lc.set_clim(0.0, vmax)
        ax.add_collection(lc)
        hits = np.asarray(tr["collision"], bool)
        if hits.any():
            edge = np.nonzero(hits & ~np.r_[False, hits[:-1]])[0]
            ax.plot(tr["x"][edge], tr["y"][edge], "x", color="cyan", ms=6, mew=1.5)
    if lc is not None:
        fig.colorbar(lc, ax=ax, fraction=0.046, label="speed [m/s]")
    ax.plot([0], [0], ">", color="lime", ms=10)
    a = result["aggregate"]
    lt = f", lap {a['lap_time_mean']:.1f} s" if a["lap_times"] else ""
    ax.set_title(title or f"{result['track']} ({result['backend']}): "
                 f"{pm(a['laps_mean'], a['laps_std'], '.2f')} laps{lt}, "
                 f"{num(a['collisions_per_km'], '.1f')} collisions/km (x = contact)")  # fmt: skip
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_aspect("equal")
    return save_figure(fig, out)


# =========================================================================== learning curves
def plot_learning_curves(metrics_jsonl: Path, out: Path) -> Path | None:
    """Episode return, laps and collisions vs env steps from a run's metrics.jsonl (None when
    it holds no training records)."""
    recs = [r for r in read_metrics(metrics_jsonl) if "env_steps" in r]
    if not recs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    x = np.asarray([r["env_steps"] for r in recs], np.float64)
    for ax, (label, keys) in zip(axes, CURVES, strict=True):
        key = next((k for k in keys if any(k in r for r in recs)), None)
        if key is not None:
            y = np.asarray([r.get(key, np.nan) if r.get(key) is not None else np.nan
                            for r in recs], np.float64)  # fmt: skip
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], "-o", ms=2)
            ax.set_title(f"{label}\n({key})", fontsize=9)
        else:
            ax.set_title(f"{label}: not logged", fontsize=9)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(metrics_jsonl).parent.name))
    return save_figure(fig, out)


def plot_curves(curves: dict[str, list[dict[str, tuple[np.ndarray, np.ndarray]]]], out: Path,
                title: str) -> Path | None:
    """Learning curves of several variants: per variant, a list (one per seed) of
    ``{label: (env steps, values)}`` for the labels of :data:`CURVES` (:func:`read_curve`);
    drawn as the mean over seeds, on the steps every seed has reached, with the min-max band.
    None when there is nothing to draw."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.5 * len(CURVES), 3.8))
    drawn = False
    for ax, (label, keys) in zip(np.atleast_1d(axes), CURVES, strict=True):
        for variant, per_seed in curves.items():
            per_seed = [c[label] for c in per_seed if len(c[label][0])]
            if not per_seed:
                continue
            grid = np.unique(np.concatenate([x for x, _ in per_seed]))
            ys = np.stack([np.interp(grid, x, y, left=np.nan, right=np.nan)
                           for x, y in per_seed])
            ok = np.isfinite(ys).all(0)  # the steps every seed has reached
            if not ok.any():
                continue
            m = ys[:, ok].mean(0)
            line, = ax.plot(grid[ok], m, label=f"{variant} (n={len(per_seed)})")
            ax.fill_between(grid[ok], ys[:, ok].min(0), ys[:, ok].max(0),
                            color=line.get_color(), alpha=0.2)
            drawn = True
        sep = " " if len(keys) == 1 else "\n"
        ax.set_title(f"{label}{sep}({' | '.join(keys)})", fontsize=9)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(title)
    return save_figure(fig, out)
