"""Draw a track: drivable area, progress field and a driven trajectory, as a PNG.

    python -m rl.envs.show --track austria --out track.png
    python -m rl.envs.show --track procedural:3 --out p3.png --trajectory traj.npy

Without --trajectory, the JAX backend's scripted lidar gap-follower drives one lap
(up to --seconds) and that path is drawn. A trajectory file is a (T, >=2) array of
world x, y (npy, loaded without pickle).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rl.tracks import Track, load_track  # noqa: E402


def scripted_lap(track: Track, seconds: float = 90.0, seed: int = 0) -> dict:
    import jax

    from rl.envs.jax_env import JaxRacecar, drive, make_params
    from rl.envs.spec import PHYSICS_DT, TaskConfig

    env = JaxRacecar(TaskConfig(laps=1, time_limit=seconds))
    out = jax.jit(drive, static_argnums=(0, 3))(env, make_params(track),
                                                 jax.random.PRNGKey(seed),
                                                 int(seconds / PHYSICS_DT))
    out = {k: np.asarray(v) for k, v in out.items()}
    end = out["terminated"] | out["truncated"]
    n = int(np.argmax(end)) + 1 if end.any() else len(end)
    return {k: v[:n] for k, v in out.items()}


def draw(track: Track, out: Path, traj: np.ndarray | None = None, title: str = "") -> Path:
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
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--track", default="procedural:0", help="name, folder, .zip or procedural:N")
    ap.add_argument("--out", default="track.png")
    ap.add_argument("--trajectory", default=None, help="(T, >=2) .npy of world x, y")
    ap.add_argument("--seconds", type=float, default=90.0, help="scripted drive length")
    args = ap.parse_args(argv)
    track = load_track(args.track)
    if args.trajectory:
        traj = np.load(args.trajectory, allow_pickle=False)[:, :2]
        title = f"trajectory {args.trajectory}"
    else:
        print(f"driving the scripted gap-follower on {track.name} (JAX backend)…")
        d = scripted_lap(track, args.seconds)
        traj = d["pose"][:, :2]
        t = len(traj) * 0.01
        title = (f"scripted drive: {t:.1f} s, laps completed {max(int(d['lap'][-1]) - 1, 0)}, "
                 f"collision steps {int(d['collision'].sum())}, "
                 f"Σreward {float(d['reward'].sum()):.1f}")
        print(title)
    print(draw(track, Path(args.out), traj, title))


if __name__ == "__main__":
    main()
