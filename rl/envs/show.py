"""Draw a track: drivable area, progress field and a driven trajectory, as a PNG.

    python -m rl.envs.show --track austria --out track.png
    python -m rl.envs.show --track procedural:3 --out p3.png --trajectory traj.npy

Without --trajectory, the scripted lidar gap follower (rl.drivers.gap_follower) drives one lap
of the JAX backend (up to --seconds) and that path is drawn (rl.plots.plot_track). A
trajectory file is a (T, >=2) array of world x, y (npy, loaded without pickle).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rl.plots import plot_track
from rl.tracks import Track, load_track


def scripted_lap(track: Track, seconds: float = 90.0, seed: int = 0) -> dict:
    import jax

    from rl.drivers import drive
    from rl.envs.jax_env import JaxRacecar, make_params
    from rl.envs.spec import PHYSICS_DT, TaskConfig

    env = JaxRacecar(TaskConfig(laps=1, time_limit=seconds))
    out = jax.jit(drive, static_argnums=(0, 3))(env, make_params(track),
                                                 jax.random.PRNGKey(seed),
                                                 int(seconds / PHYSICS_DT))
    out = {k: np.asarray(v) for k, v in out.items()}
    end = out["terminated"] | out["truncated"]
    n = int(np.argmax(end)) + 1 if end.any() else len(end)
    return {k: v[:n] for k, v in out.items()}


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
    print(plot_track(track, Path(args.out), traj, title))


if __name__ == "__main__":
    main()
