"""Make racecar_gym (axelbr/racecar_gym) importable and runnable on Python ≥ 3.11, numpy 2.

    python scripts/patch_racecar_gym.py [RACECAR_GYM] [--scenes DIR]

racecar_gym has no PyPI release; its requirements pin numpy 1.22 and gymnasium 0.28, and its
source fails on a current stack in four places, which this script edits (the whole recipe is
in the docstring of rl/envs/racecar_gym_env.py):

* ``racecar_gym/core/specs.py`` — ``AgentSpec`` has dataclass instances as field defaults
  (``vehicle: VehicleSpec = VehicleSpec()``); Python 3.11 rejects that ("mutable default …
  use default_factory"): → ``field(default_factory=VehicleSpec)``, likewise ``TaskSpec``.
* ``racecar_gym/bullet/actuators.py`` — the motor, speed and steering commands arrive as
  (1,) arrays and reach ``pybullet.setJointMotorControl2`` as arrays; numpy 2 refuses the
  conversion ("only 0-dimensional arrays can be converted to Python scalars"): → the
  command's single element as a Python float.
* ``racecar_gym/bullet/sensors.py``, ``racecar_gym/bullet/util.py`` — ``np.float`` / ``np.int``
  in nptyping annotations (removed in numpy 1.24): → ``float`` / ``int``.
* nptyping 1.4.x (racecar_gym needs ``nptyping<2``; nptyping 2.x uses ``np.bool8``, gone in
  numpy 2) — ``nptyping/types/_unicode.py`` subclasses ``np.compat.unicode`` (``np.compat`` is
  gone in numpy 2): → ``str``. Patched in the nptyping that the running Python imports.

``RACECAR_GYM`` is a racecar_gym checkout (the folder holding ``racecar_gym/``) or the
installed package folder itself; by default, where the running Python would import it from
(located without importing it). Idempotent: an edit already made is skipped. If the text an
edit expects is in neither its old nor its new form, the script stops with exit code 1,
naming the file and the text, and changes nothing in that file. A patched file is written
anew (never edited in place), so a package cache hard-linked to it stays as it was.

``--scenes DIR`` also installs tracks so that racecar_gym downloads nothing at run time: every
``DIR/<name>.zip`` (racecar_gym's release archives) is unpacked, and every ``DIR/<name>/``
holding ``<name>.yml`` and ``maps/maps.npz`` is copied, into ``models/scenes/`` of the
checkout (racecar_gym reads its scenes from there: install it editable, ``pip install -e``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import zipfile
from pathlib import Path

# (path relative to the package folder, [(old, new), ...]); every occurrence of old is replaced
RACECAR_GYM_EDITS: list[tuple[str, list[tuple[str, str]]]] = [
    ("core/specs.py", [
        ("    vehicle: VehicleSpec = VehicleSpec()",
         "    vehicle: VehicleSpec = field(default_factory=VehicleSpec)"),
        ("    task: TaskSpec = TaskSpec()",
         "    task: TaskSpec = field(default_factory=TaskSpec)"),
    ]),
    ("bullet/actuators.py", [
        ("        acceleration = np.clip(acceleration, -1, +1)\n",
         "        acceleration = float(np.clip(np.ravel(acceleration)[0], -1, +1))\n"),
        ("        target_speed = np.clip(target_speed, -1, +1)  # sanity check\n",
         "        target_speed = float(np.clip(np.ravel(target_speed)[0], -1, +1))"
         "  # sanity check\n"),
        ("        angle = command * self._config.max_steering_angle",
         "        angle = float(np.ravel(command)[0]) * self._config.max_steering_angle"),
    ]),
    ("bullet/sensors.py", [
        ("NDArray[(Any,), np.float]", "NDArray[(Any,), float]"),
        ("NDArray[(6,), np.float]", "NDArray[(6,), float]"),
        ("NDArray[(Any, Any, 3), np.int]", "NDArray[(Any, Any, 3), int]"),
    ]),
    ("bullet/util.py", [
        ("NDArray[(6,), np.float]", "NDArray[(6,), float]"),
    ]),
]  # fmt: skip

NPTYPING_EDITS: list[tuple[str, list[tuple[str, str]]]] = [
    ("types/_unicode.py", [
        ("class Unicode(NPType, np.compat.unicode, metaclass=_UnicodeMeta):",
         "class Unicode(NPType, str, metaclass=_UnicodeMeta):"),
    ]),
]  # fmt: skip


class PatchError(RuntimeError):
    pass


def patch_file(path: Path, edits: list[tuple[str, str]]) -> bool:
    """Apply ``edits`` to ``path``; True if it changed. Raises PatchError (naming the file and
    the expected text) before writing anything if an edit finds neither its old nor new text."""
    if not path.is_file():
        raise PatchError(f"{path}: file not found")
    with open(path, encoding="utf-8", newline="") as f:  # line endings kept as they are
        text = f.read()
    eol = "\r\n" if "\r\n" in text else "\n"
    new_text = text
    for old, new in edits:
        old, new = old.replace("\n", eol), new.replace("\n", eol)
        if old in new_text:
            new_text = new_text.replace(old, new)
        elif new not in new_text:
            raise PatchError(f"{path}: expected text not found (racecar_gym or nptyping changed "
                             f"upstream?): {old.strip()!r}")
    if new_text == text:
        return False
    # a new file, not an edit in place: an installer may have hard-linked the installed file
    # to its cache (uv does), which an in-place write would patch too
    tmp = path.with_name(path.name + ".patching")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(new_text)
    shutil.copymode(path, tmp)
    os.replace(tmp, path)
    return True


def apply(package: Path, edits: list[tuple[str, list[tuple[str, str]]]], what: str) -> None:
    for rel, file_edits in edits:
        path = package / rel
        changed = patch_file(path, file_edits)
        print(f"{what}: {path}: {'patched' if changed else 'already patched'}")


def racecar_gym_package(arg: str | None) -> Path:
    """The racecar_gym package folder (the one holding core/specs.py)."""
    if arg is not None:
        p = Path(arg).resolve()
        for cand in (p, p / "racecar_gym"):
            if (cand / "core" / "specs.py").is_file():
                return cand
        raise PatchError(f"{p}: neither it nor {p / 'racecar_gym'} holds core/specs.py")
    spec = importlib.util.find_spec("racecar_gym")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("racecar_gym is not installed in this Python; pass its folder")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def nptyping_package() -> Path | None:
    spec = importlib.util.find_spec("nptyping")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def install_scenes(package: Path, src: Path) -> None:
    """Unpack DIR/<name>.zip and copy DIR/<name>/ scenes into <checkout>/models/scenes/."""
    scenes = package.parent / "models" / "scenes"
    if not scenes.parent.is_dir():
        raise PatchError(f"{scenes.parent}: not found — racecar_gym reads its scenes from its "
                         "checkout's models/ folder: install it editable from a clone")
    scenes.mkdir(exist_ok=True)
    found = False
    for z in sorted(src.glob("*.zip")):
        with zipfile.ZipFile(z) as f:
            f.extractall(scenes)
        print(f"scenes: {z} -> {scenes / z.stem}")
        found = True
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        if (d / f"{d.name}.yml").is_file() and (d / "maps" / "maps.npz").is_file():
            shutil.copytree(d, scenes / d.name, dirs_exist_ok=True)
            print(f"scenes: {d} -> {scenes / d.name}")
            found = True
        else:
            print(f"scenes: {d}: skipped (no {d.name}.yml with maps/maps.npz: not a racecar_gym "
                  "scene)")
    if not found:
        raise PatchError(f"{src}: no racecar_gym scene (<name>.zip or <name>/<name>.yml)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("racecar_gym", nargs="?",
                    help="racecar_gym checkout or package folder (default: the installed one)")
    ap.add_argument("--scenes", help="folder of racecar_gym scenes (<name>.zip, <name>/) to "
                                     "install into models/scenes/")
    ap.add_argument("--no-nptyping", action="store_true", help="leave nptyping alone")
    args = ap.parse_args(argv)
    try:
        package = racecar_gym_package(args.racecar_gym)
        apply(package, RACECAR_GYM_EDITS, "racecar_gym")
        if not args.no_nptyping:
            npt = nptyping_package()
            if npt is None:
                print("nptyping: not installed in this Python (pip install 'nptyping==1.4.4'), "
                      "not patched", file=sys.stderr)
            elif (npt / "types" / "_unicode.py").is_file():
                apply(npt, NPTYPING_EDITS, "nptyping")
            else:
                raise PatchError(f"{npt}: not nptyping 1.4.x (no types/_unicode.py); racecar_gym "
                                 "needs nptyping<2: pip install 'nptyping==1.4.4'")
        if args.scenes:
            install_scenes(package, Path(args.scenes))
    except PatchError as e:
        print(f"patch_racecar_gym: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
