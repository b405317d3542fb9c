"""racecar_gym glue that can be checked without racecar_gym (not on PyPI, not installed here):
scripts/patch_racecar_gym.py on a stand-in source tree, and the conventions wrapper's
handling of PyBullet's default client and of racecar_gym's in-place info dict on a fake env.

The recipe itself (rl/envs/racecar_gym_env.py) was run by hand on racecar_gym 7049676; see
that module's docstring for what was checked."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from rl.envs import spec

ROOT = Path(__file__).resolve().parents[1]


def _script():
    s = importlib.util.spec_from_file_location("patch_racecar_gym",
                                               ROOT / "scripts/patch_racecar_gym.py")
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def _upstream_tree(root: Path, edits) -> Path:
    """A racecar_gym checkout stand-in: every file the script edits, holding the upstream
    text each edit expects between lines of other code."""
    pkg = root / "racecar_gym"
    for rel, file_edits in edits:
        f = pkg / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("import numpy as np\n" + "\n".join(old.rstrip("\n") + "\n    pass"
                                                          for old, _ in file_edits) + "\n")
    return pkg


def test_patch_script_applies_once_and_fails_loudly(tmp_path, capsys):
    mod = _script()
    pkg = _upstream_tree(tmp_path / "checkout", mod.RACECAR_GYM_EDITS)
    assert mod.main([str(tmp_path / "checkout"), "--no-nptyping"]) == 0
    specs = (pkg / "core/specs.py").read_text()
    assert "vehicle: VehicleSpec = field(default_factory=VehicleSpec)" in specs
    assert "= VehicleSpec()" not in specs and "= TaskSpec()" not in specs
    assert "np.float]" not in (pkg / "bullet/sensors.py").read_text()
    act = (pkg / "bullet/actuators.py").read_text()
    assert act.count("float(np.") == 3
    out = capsys.readouterr().out
    assert out.count(": patched") == len(mod.RACECAR_GYM_EDITS)
    # idempotent: a second run changes nothing (the package folder itself works too)
    before = {p: p.read_text() for p in pkg.rglob("*.py")}
    assert mod.main([str(pkg), "--no-nptyping"]) == 0
    assert {p: p.read_text() for p in pkg.rglob("*.py")} == before
    assert capsys.readouterr().out.count("already patched") == len(mod.RACECAR_GYM_EDITS)
    # text neither old nor new: exit 1, naming the file and the text, the file untouched
    util = pkg / "bullet/util.py"
    util.write_text("def get_pose(id): ...\n")
    assert mod.main([str(pkg), "--no-nptyping"]) == 1
    err = capsys.readouterr().err
    assert str(util) in err and "NDArray[(6,), np.float]" in err
    assert util.read_text() == "def get_pose(id): ...\n"
    assert mod.main([str(tmp_path), "--no-nptyping"]) == 1  # not a racecar_gym folder
    assert "core/specs.py" in capsys.readouterr().err


def test_patch_script_nptyping_edit_and_scenes(tmp_path):
    mod = _script()
    (tmp_path / "types").mkdir()
    f = tmp_path / "types/_unicode.py"  # nptyping 1.4.4's wheel has CRLF line endings
    original = b"import numpy as np\r\n\r\nclass Unicode(NPType, np.compat.unicode, " \
               b"metaclass=_UnicodeMeta):\r\n    pass\r\n"
    f.write_bytes(original)
    cache = tmp_path / "cached_unicode.py"  # an installer's cache, hard-linked (uv does that)
    os.link(f, cache)
    assert mod.patch_file(f, mod.NPTYPING_EDITS[0][1]) is True
    assert f.read_bytes() == original.replace(b"np.compat.unicode", b"str")  # CRLF kept
    assert cache.read_bytes() == original  # the cache is not patched through the link
    assert mod.patch_file(f, mod.NPTYPING_EDITS[0][1]) is False
    # scenes: <name>/ with <name>.yml and maps/maps.npz is copied into models/scenes/
    pkg = _upstream_tree(tmp_path / "checkout", mod.RACECAR_GYM_EDITS)
    (pkg.parent / "models").mkdir()
    src = tmp_path / "tracks"
    (src / "demo" / "maps").mkdir(parents=True)
    (src / "demo" / "demo.yml").write_text("name: demo\n")
    (src / "demo" / "maps" / "maps.npz").write_bytes(b"")
    (src / "meshonly").mkdir()
    mod.install_scenes(pkg, src)
    assert (pkg.parent / "models/scenes/demo/demo.yml").is_file()
    assert not (pkg.parent / "models/scenes/meshonly").exists()


class _FakeRaceEnv(gym.Env):
    """Like racecar_gym's SingleAgentRaceEnv: connects PyBullet's client on its first reset
    and never disconnects; returns one info dict, updated in place, at every step."""

    def __init__(self):
        import pybullet

        self.p = pybullet
        self.observation_space = gym.spaces.Dict({
            "pose": gym.spaces.Box(-np.inf, np.inf, (6,), np.float64),
            "time": gym.spaces.Box(0.0, 1.0, ()),
        })  # fmt: skip
        self.action_space = gym.spaces.Dict({
            "motor": gym.spaces.Box(-1.0, 1.0, (1,)), "steering": gym.spaces.Box(-1.0, 1.0, (1,)),
        })  # fmt: skip
        self.started = False
        self.info = {}

    def reset(self, *, seed=None, options=None):
        if not self.started:
            self.p.connect(self.p.DIRECT)
            self.started = True
        self.info.update(time=0.0, lap=1, progress=0.0, wall_collision=False)
        return {"pose": np.zeros(6), "time": np.array(0.0)}, self.info

    def step(self, action):
        self.info["time"] += 0.01
        return {"pose": np.zeros(6), "time": np.array(self.info["time"])}, 0.0, False, False, \
            self.info


def test_wrapper_disconnects_client_0_and_copies_info():
    pybullet = pytest.importorskip("pybullet")
    from rl.envs.racecar_gym_env import RacecarGymConventions

    if pybullet.isConnected(0):
        pytest.skip("PyBullet client 0 is held by another test's environment")
    for _ in range(2):  # a second env after closing the first starts on a free client 0
        env = RacecarGymConventions(_FakeRaceEnv(), spec.TaskConfig())
        obs, info0 = env.reset()
        assert pybullet.isConnected(0) and obs["time"].shape == (1,)
        _, _, _, _, info1 = env.step({"motor": [0.0], "steering": [0.0]})
        assert info0["time"] == 0.0 and info1["time"] == pytest.approx(0.01)  # copies
        env.close()
        assert not pybullet.isConnected(0)
    other = pybullet.connect(pybullet.DIRECT)  # client 0 held by someone else: refused
    try:
        assert other == 0
        with pytest.raises(RuntimeError, match="client 0"):
            RacecarGymConventions(_FakeRaceEnv(), spec.TaskConfig()).reset()
    finally:
        pybullet.disconnect(other)


def test_wrapper_rescales_a_capped_speed_command():
    """TaskConfig.speed_max reaches racecar_gym as the command its own speed actuator reads
    (target (c + 1) / 2 × 3.5 m/s): full command on a car capped at 2 m/s asks for 2 m/s."""
    pytest.importorskip("pybullet")
    from rl.envs.racecar_gym_env import RacecarGymConventions

    sent = []

    class _Recorder(_FakeRaceEnv):
        def step(self, action):
            sent.append(action)
            return super().step(action)

    for speed_max, speed_min, a, want in ((2.0, 0.0, 1.0, 2.0),
                                          (spec.SPEED_MAX_VELOCITY, 0.0, 1.0,
                                           spec.SPEED_MAX_VELOCITY),
                                          (2.5, 0.5, -1.0, 0.5)):  # a floor: −1 asks 0.5 m/s
        rec = _Recorder()
        rec.info.update(time=0.0, lap=1, progress=0.0, wall_collision=False)
        task = spec.TaskConfig(actuator="speed", speed_max=speed_max, speed_min=speed_min)
        env = RacecarGymConventions(rec, task)
        env.step({"speed": np.array([a]), "steering": np.array([0.25])})
        c = float(np.asarray(sent[-1]["speed"]).reshape(-1)[0])
        assert (c + 1) / 2 * spec.SPEED_MAX_VELOCITY == pytest.approx(want, abs=1e-6)
        assert float(np.asarray(sent[-1]["steering"])[0]) == 0.25
