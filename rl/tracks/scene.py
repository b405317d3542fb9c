"""racecar_gym scenes on disk: where they are found and cached, and how one is read.

A scene is a folder (or a .zip holding one) in racecar_gym's format::

    <name>.yml            map: resolution 0.05, origin [ox, oy, 0], maps, starting_grid, checkpoints
    <name>.sdf            models `walls` and `floor`
    meshes/Walls.obj      the walls, 1 m tall
    maps/maps.npz         drivable_area (H, W) bool, norm_distance_from_start,
                          norm_distance_to, norm_distance_to_obstacle in [0, 1]
    maps/starts.npz       data (K, 6): x y z roll pitch yaw

Pixel of world (x, y): row = int(H - (y - oy) / res), col = int((x - ox) / res).
Tracks start at the origin facing +x; progress grows in that direction.

The leaf of rl.tracks: it imports nothing else from the package.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


class TrackError(RuntimeError):
    """A scene that is missing or broken; the message says which file and why."""


def world_to_pixel_array(x, y, origin, resolution, shape, xp=np):
    """(row, col) int32 arrays of world points, clipped into the map; numpy or jax.numpy.

    Same as int(...) truncation for points inside the map (all there are positive)."""
    h, w = shape
    ox, oy = origin
    r = xp.floor(h - (y - oy) / resolution).astype(xp.int32)
    c = xp.floor((x - ox) / resolution).astype(xp.int32)
    return xp.clip(r, 0, h - 1), xp.clip(c, 0, w - 1)


def tracks_dir() -> Path:
    env = os.environ.get("RACEFORMER_TRACKS")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data" / "racecar_tracks"


CACHE_ENV = "RACEFORMER_CACHE"  # the environment variable naming the cache's root


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    base = Path(env) if env else Path.home() / ".cache" / "raceformer"
    d = base / "tracks"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".probe"
        probe.touch()
        probe.unlink()
    except OSError:
        d = Path(tempfile.gettempdir()) / "raceformer-tracks"
        d.mkdir(parents=True, exist_ok=True)
    return d


def resolve_scene(name_or_path: str | os.PathLike) -> Path:
    """A scene folder or .zip for a path, or a bare name under tracks_dir()."""
    p = Path(name_or_path)
    if p.exists():
        return p
    s = str(name_or_path)
    if os.sep not in s and "/" not in s:
        base = tracks_dir()
        for cand in (base / s, base / f"{s}.zip"):
            if cand.exists():
                return cand
        raise TrackError(f"track {s!r}: neither {base / s} nor {base / s}.zip exists "
                         f"(set RACEFORMER_TRACKS to the folder holding racecar_gym scenes)")
    raise TrackError(f"track {s!r}: no such file or folder")


def hash_files(paths, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def extract_zip(zpath: Path) -> Path:
    """Extract once into the cache, named by the zip's content hash; returns the scene dir.
    A member that would land outside the extraction folder (``../x``, ``/x``) is refused
    before anything is written: one TrackError naming the archive and the member."""
    key = hash_files([zpath])
    out = cache_dir() / f"{zpath.stem}-zip-{key}"
    if not (out / ".complete").exists():
        try:
            zf = zipfile.ZipFile(zpath)
        except zipfile.BadZipFile as e:
            raise TrackError(f"{zpath}: not a valid zip ({e})") from e
        with zf:
            for info in zf.infolist():
                name = info.filename
                norm = posixpath.normpath(name.replace("\\", "/"))
                if norm.startswith("/") or norm.split("/")[0] == ".." or name[1:2] == ":":
                    raise TrackError(f"{zpath}: refused member {name!r} (it would be written "
                                     f"outside the extraction folder)")
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".extract-"))
            try:
                zf.extractall(tmp)
                (tmp / ".complete").touch()
            except (OSError, zipfile.BadZipFile) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise TrackError(f"{zpath}: cannot extract ({type(e).__name__}: {e})") from e
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:  # a concurrent process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    ymls = list(out.glob("*.yml")) + list(out.glob("*/*.yml"))
    if not ymls:
        raise TrackError(f"{zpath}: no <name>.yml in the archive")
    return ymls[0].parent


def scene_yml(scene: Path) -> Path:
    cand = scene / f"{scene.name}.yml"
    if cand.exists():
        return cand
    ymls = sorted(scene.glob("*.yml"))
    if len(ymls) != 1:
        raise TrackError(f"{scene}: expected one <name>.yml, found {[y.name for y in ymls]}")
    return ymls[0]


def read_scene_config(scene: Path) -> dict:
    yml = scene_yml(scene)
    try:
        cfg = yaml.safe_load(yml.read_text())
        m = cfg["map"]
        cfg["_resolution"] = float(m["resolution"])
        cfg["_origin"] = (float(m["origin"][0]), float(m["origin"][1]))
        cfg["_checkpoints"] = int(m.get("checkpoints", 5))
        cfg["_maps"] = scene / m.get("maps", "maps/maps.npz")
        cfg["_starts"] = scene / m.get("starting_grid", "maps/starts.npz")
        cfg["_name"] = str(cfg.get("name", yml.stem))
    except (yaml.YAMLError, KeyError, TypeError, IndexError, ValueError) as e:
        raise TrackError(f"{yml}: broken scene config ({type(e).__name__}: {e})") from e
    return cfg

