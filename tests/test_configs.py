"""Every shipped config file loads into its dataclass (a typo in one fails here, not on a
cluster node), and the seed keys keep their documented values."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from etl import configlib
from etl.config import load_config as load_etl
from rl.config import load_config as load_rl
from rl.study_config import load_study
from train.config import load_pretrain_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOADERS = {"etl": load_etl, "pretrain": load_pretrain_config, "rl": load_rl,
           "study": load_study}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_config_file_loads(path):
    kind = path.stem.split("_")[0]
    assert kind in LOADERS, f"{path.name}: no loader for prefix {kind!r}"
    cfg = LOADERS[kind](path)
    assert cfg is not None
    assert path.read_text().lstrip().startswith("#"), f"{path.name} must open with how to run it"


def test_seed_values():
    p = load_pretrain_config(CONFIGS / "pretrain_cmht.toml")
    assert (p.model.embed_dim, p.model.depth, p.model.num_heads) == (256, 6, 8)
    assert (p.model.patch_size, p.model.fusion_depth) == (16, 6)
    assert (p.training.batch_size, p.training.learning_rate, p.training.steps) == (64, 3e-4, 100000)
    assert p.training.mask_ratio == 0.5
    r = load_rl(CONFIGS / "rl_racecar.toml")
    assert (r.ppo.learning_rate, r.ppo.clip_eps, r.ppo.gae_lambda, r.ppo.gamma) == (
        3e-4,
        0.2,
        0.95,
        0.99,
    )
    assert r.ppo.update_epochs == 4


def test_cpu_study_pretrains_the_policy_sized_model_with_the_visible_loss():
    """The CPU study pretrains configs/pretrain_cpu.toml (issue 13 §1): the model the multimodal
    policy runs (embed 64, one encoder and one fusion block, 16² patches, lidar/radar/gps/imu),
    with the visible patches in the loss (without them the tokens drop the vehicles: README)."""
    study = load_study(CONFIGS / "study_cpu.toml")
    assert Path(study.pretrain.config).name == "pretrain_cpu.toml"
    p = load_pretrain_config(CONFIGS / "pretrain_cpu.toml")
    m = p.model
    assert (m.embed_dim, m.depth, m.fusion_depth, m.patch_size) == (64, 1, 1, 16)
    assert tuple(m.modalities) == ("lidar", "radar", "gps", "imu")
    assert p.training.visible_loss_weight == 30.0 and p.training.mask_ratio == 0.5
    # the measured setting: 24 of 96 drives held out whole, so the probe has ≥ 5 test drives
    assert study.data.synth_drives == 96
    assert {"output.split=drive", "output.val_fraction=0.25"} <= set(study.data.etl_set)


# --------------------------------------------------------------------------- enumerations
ENUMS = [  # (loader, key, allowed): every enumeration is a Literal field checked at load time
    ("etl", "output.split", ["block", "drive"]),
    ("pretrain", "model.fusion", ["self", "cross"]),
    ("pretrain", "model.absent", ["drop", "token"]),
    ("pretrain", "model.dtype", ["float32", "bfloat16"]),
    ("pretrain", "model.pos_embed", ["sincos", "learned"]),
    ("pretrain", "model.attention_impl", ["auto", "xla", "cudnn"]),
    ("pretrain", "model.score_dtype", ["float32", "compute"]),
    ("pretrain", "model.decoder_pos", ["all", "masked"]),
    ("pretrain", "mesh.distributed", ["auto", "on", "off"]),
    ("rl", "env.backend", ["jax", "bullet", "racecar_gym"]),
    ("rl", "env.reset_mode", ["grid", "random"]),
    ("rl", "model.policy", ["lidar_mlp", "multimodal"]),
    ("rl", "finetune.init", ["pretrained", "scratch"]),
    ("rl", "finetune.absent", ["zeros", "token"]),
]


@pytest.mark.parametrize("kind,key,allowed", ENUMS, ids=[k for _, k, _ in ENUMS])
def test_enumeration_bad_value_fails_at_load_naming_the_key(kind, key, allowed):
    with pytest.raises(configlib.ConfigError) as e:
        LOADERS[kind](None, [f"{key}='bogus'"])
    assert str(e.value) == f"{key}: expected one of {allowed}, got 'bogus'"
    needs = {"finetune.init": ["finetune.pretrained_ckpt='runs/x/ckpt'"]}
    for value in allowed:  # every allowed value loads
        cfg = LOADERS[kind](None, [f"{key}='{value}'", *needs.get(key, [])])
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value


def test_enumerations_are_checked_when_built_in_code():
    """Dataclasses also built outside the loader check their Literal fields in __post_init__
    (configlib.check_literals), with the same one-line message."""
    from rl.config import EnvConfig, FinetuneConfig, RLConfig
    from rl.config import ModelConfig as PolicyConfig
    from rl.envs.spec import TaskConfig
    from train.config import ModelConfig

    with pytest.raises(configlib.ConfigError,
                       match=r"^TaskConfig\.reset_mode: expected one of \['grid', 'random'\], "
                             r"got 'spiral'$"):
        TaskConfig(reset_mode="spiral")
    with pytest.raises(configlib.ConfigError, match=r"^model\.fusion: expected one of"):
        ModelConfig(fusion="both")
    with pytest.raises(configlib.ConfigError, match=r"^model\.dtype: expected one of"):
        dataclasses.replace(ModelConfig(), dtype="float16")
    with pytest.raises(configlib.ConfigError, match=r"^env\.backend: expected one of"):
        RLConfig(env=EnvConfig(backend="carla"))
    with pytest.raises(configlib.ConfigError, match=r"^model\.policy: expected one of"):
        RLConfig(model=PolicyConfig(policy="transformer"))
    with pytest.raises(configlib.ConfigError, match=r"^finetune\.absent: expected one of"):
        RLConfig(finetune=FinetuneConfig(absent="drop"))
    assert TaskConfig(reset_mode="random").reset_mode == "random"


@dataclasses.dataclass(frozen=True)
class _Choices:  # for test_check_literals_generic (module level: get_type_hints resolves it)
    mode: Literal["a", "b"] = "a"
    maybe: Literal["x", "y"] | None = None
    many: tuple[Literal["p", "q"], ...] = ("p",)
    free: str = "anything"


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Choices = dataclasses.field(default_factory=_Choices)


def test_check_literals_generic():
    configlib.check_literals(_Choices(maybe="y", many=("q", "p"), free="z"))
    configlib.check_literals(_Outer())
    for kw, msg in [({"mode": "c"}, r"^sec\.mode: expected one of \['a', 'b'\], got 'c'$"),
                    ({"maybe": "z"}, r"^sec\.maybe: expected "),
                    ({"many": ("p", "r")}, r"^sec\.many\[1\]: expected one of")]:
        with pytest.raises(configlib.ConfigError, match=msg):
            configlib.check_literals(_Choices(**kw), "sec")
    with pytest.raises(configlib.ConfigError, match=r"^inner\.mode: expected one of"):
        configlib.check_literals(_Outer(inner=_Choices(mode="z")))


def test_enumerations_are_literal_fields():
    """Every enumeration above is a Literal field of its config dataclass (so the loader and
    check_literals check it; no hand-written membership test is needed)."""
    import typing

    from etl.config import ETLConfig
    from rl.config import RLConfig
    from rl.envs.spec import TaskConfig
    from train.config import PretrainConfig

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", tp

    literal = {k for root in (ETLConfig, RLConfig, PretrainConfig, TaskConfig)
               for k, tp in walk(root) if typing.get_origin(tp) is typing.Literal}
    assert {k for _, k, _ in ENUMS} <= literal
    assert "reset_mode" in literal  # TaskConfig's


# --------------------------------------------------------------------------- exit code 2
def _pretrain_ckpt(tmp_path):
    """A pretraining checkpoint whose config record has an unknown [model] key."""
    import numpy as np

    from train.checkpoint import Checkpointer

    c = Checkpointer(tmp_path / "pre" / "ckpt", async_save=False)
    c.save(1, {"x": np.zeros(1, np.float32)}, {}, {"model": {"bogus_key": 1}, "preprocess": {}})
    c.close()
    return str(tmp_path / "pre")


def _ppo_ckpt(tmp_path):
    """A PPO checkpoint whose config record has an unknown [ppo] key."""
    import numpy as np

    from train.checkpoint import Checkpointer

    c = Checkpointer(tmp_path / "ppo" / "ckpt", async_save=False)
    c.save(1, {"x": np.zeros(1, np.float32)}, {},
           {"rl": {"ppo": {"bogus_key": 1}}, "kind": "ppo"})
    c.close()
    return str(tmp_path / "ppo" / "ckpt")


def _main(module):
    import importlib

    return importlib.import_module(module).main


RL_TINY = str(CONFIGS / "rl_tiny.toml")
PRE_TINY = str(CONFIGS / "pretrain_tiny.toml")
ENTRY_POINTS = {  # prog -> (argv given tmp_path, the bad key the message names)
    "etl.build": (lambda t: ["--out", str(t / "o"), "--set", "output.bogus_key=1"],
                  "output.bogus_key"),
    "train.pretrain": (lambda t: ["--config", PRE_TINY, "--set", "training.bogus_key=1"],
                       "training.bogus_key"),
    "train.probe": (lambda t: ["--ckpt", _pretrain_ckpt(t)], "model.bogus_key"),
    "train.visualize": (lambda t: ["--ckpt", _pretrain_ckpt(t), "--out", str(t / "v")],
                        "model.bogus_key"),
    "rl.ppo": (lambda t: ["--set", "ppo.bogus_key=1"], "ppo.bogus_key"),
    "rl.imitate": (lambda t: ["--set", "imitate.teacher.bogus_key=1"],
                   "imitate.teacher.bogus_key"),
    "rl.compare": (lambda t: ["--config", RL_TINY, "--set", "env.backend='carla'",
                              "--variant", "a:seed=1", "--out", str(t / "c")], "env.backend"),
    "rl.evaluate": (lambda t: ["--ckpt", _ppo_ckpt(t), "--out", str(t / "e")],
                    "ppo.bogus_key"),
    "benchmarks.etl": (lambda t: ["--set", "output.bogus_key=1"], "output.bogus_key"),
    "benchmarks.pretrain": (lambda t: ["--config", PRE_TINY, "--set", "model.fusion='x'"],
                            "model.fusion"),
    "benchmarks.ppo": (lambda t: ["--set", "model.policy='x'"], "model.policy"),
    "benchmarks.feature_geometry": (lambda t: ["--set", "model.pooling='x'"], "model.pooling"),
}


@pytest.mark.parametrize("prog", sorted(ENTRY_POINTS))
def test_config_error_exits_2_with_one_line(prog, tmp_path, capsys):
    argv, key = ENTRY_POINTS[prog]
    argv = argv(tmp_path)
    capsys.readouterr()
    assert _main(prog)(argv) == configlib.EXIT_CONFIG == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: config error: {key}: "), err[0]


# --------------------------------------------------------------------------- references
ROOT = CONFIGS.parent
# what people copy from: config comments, the README, module docstrings, Slurm scripts
DOC_FILES = sorted({*CONFIGS.glob("*.toml"), ROOT / "README.md", ROOT / "demo.py",
                    *(f for d in ("etl", "train", "rl", "benchmarks", "slurm", "scripts")
                      for f in (ROOT / d).rglob("*") if f.suffix in (".py", ".sh"))})


def _doc_text(path: Path) -> str:
    """The comment lines of a TOML config (its values are checked by loading it); whole files
    otherwise."""
    text = path.read_text()
    if path.suffix == ".toml":
        return "\n".join(ln for ln in text.splitlines() if ln.lstrip().startswith("#"))
    return text


def _references(pattern: str) -> dict[str, set[str]]:
    import re

    out: dict[str, set[str]] = {}
    for f in DOC_FILES:
        for m in re.findall(pattern, _doc_text(f)):
            out.setdefault(m, set()).add(str(f.relative_to(ROOT)))
    return out


def test_named_config_files_and_scripts_exist():
    """Every configs/*.toml (also a bare rl_*.toml in a config comment), slurm/*.sh and
    scripts/*.py that a comment, the README or a docstring names exists."""
    refs = _references(r"(?:configs|slurm|scripts)/[\w.-]+\.(?:toml|sh|py)\b")
    for name, where in _references(r"(?<![/\w])(?:rl|pretrain|etl)_[\w-]*\.toml\b").items():
        refs.setdefault(f"configs/{name}", set()).update(where)
    assert "configs/rl_racecar.toml" in refs  # the scan finds what it should
    missing = {k: sorted(v) for k, v in refs.items() if not (ROOT / k).is_file()}
    assert not missing, f"named but missing (file: where named): {missing}"


def test_named_python_modules_exist():
    """Every ``python -m <module>`` in a comment, the README or a docstring is a module of the
    project (found without running it)."""
    import importlib.util

    refs = _references(r"python -m ([A-Za-z_][\w.]*[A-Za-z_0-9])")
    assert "rl.ppo" in refs
    missing = {m: sorted(w) for m, w in refs.items()
               if m.split(".")[0] in ("etl", "train", "rl", "benchmarks")
               and importlib.util.find_spec(m) is None}
    assert not missing, f"python -m of a missing module (module: where named): {missing}"
    foreign = {m for m in refs if m.split(".")[0] not in ("etl", "train", "rl", "benchmarks")}
    assert foreign <= {"pip", "pytest", "venv", "uv"}, f"unexpected python -m targets: {foreign}"


# --------------------------------------------------------------------------- ranges
RANGES = [  # (loader, --set override, the one line expected): checked when loaded
    ("pretrain", "training.mask_ratio=0", "training.mask_ratio: must be in (0, 1), got 0"),
    ("pretrain", "training.mask_ratio=1.0", "training.mask_ratio: must be in (0, 1), got 1"),
    ("pretrain", "training.learning_rate=-3e-4",
     "training.learning_rate: must be > 0, got -0.0003"),
    ("pretrain", "training.batch_size=0", "training.batch_size: must be ≥ 1, got 0"),
    ("pretrain", "training.visible_loss_weight=-1",
     "training.visible_loss_weight: must be ≥ 0, got -1"),
    ("pretrain", "training.ckpt_every=0", "training.ckpt_every: must be ≥ 1, got 0"),
    ("pretrain", "training.steps=-5", "training.steps: must be ≥ 1, got -5"),
    ("pretrain", "training.b2=1.0", "training.b2: must be in [0, 1), got 1"),
    ("pretrain", "training.grad_clip=nan", "training.grad_clip: must be ≥ 0, got nan"),
    ("pretrain", "model.patch_size=0", "model.patch_size: must be ≥ 1, got 0"),
    ("pretrain", "model.num_heads=3", "model.num_heads: must divide embed_dim (256), got 3"),
    ("pretrain", "data.read_threads=0", "data.read_threads: must be ≥ 1, got 0"),
    ("pretrain", "mesh.fsdp=0", "mesh.fsdp: must be ≥ 1, got 0"),
    ("pretrain", "mesh.data=0", "mesh.data: must be ≥ 1, got 0"),
    ("etl", "output.val_fraction=1.5", "output.val_fraction: must be in [0, 1), got 1.5"),
    ("etl", "output.shard_size=0", "output.shard_size: must be ≥ 1, got 0"),
    ("etl", "output.block_s=0", "output.block_s: must be > 0, got 0"),
    ("etl", "sync.tolerance_s=-1", "sync.tolerance_s: must be ≥ 0, got -1"),
    ("etl", "preprocess.lidar.resolution=0", "preprocess.lidar.resolution: must be > 0, got 0"),
    ("etl", "preprocess.radar.grid.x_max=-40",
     "preprocess.radar.grid.x_max: must be greater than x_min (-32), got -40"),
    ("etl", "preprocess.radar.velocity_max=-31",
     "preprocess.radar.velocity_max: must be greater than velocity_min (-30), got -31"),
    ("etl", "preprocess.image.rgb_size=[0, 224]",
     "preprocess.image.rgb_size: must be ≥ 1, got 0"),
    ("etl", "preprocess.max_boxes=0", "preprocess.max_boxes: must be ≥ 1, got 0"),
    ("rl", "ppo.learning_rate=-1e-3", "ppo.learning_rate: must be ≥ 0, got -0.001"),
    ("rl", "ppo.num_envs=0", "ppo.num_envs: must be ≥ 1, got 0"),
    ("rl", "ppo.num_steps=0", "ppo.num_steps: must be ≥ 1, got 0"),
    ("rl", "ppo.update_epochs=0", "ppo.update_epochs: must be ≥ 1, got 0"),
    ("rl", "ppo.num_minibatches=0", "ppo.num_minibatches: must be ≥ 1, got 0"),
    ("rl", "ppo.gamma=0", "ppo.gamma: must be in (0, 1], got 0"),
    ("rl", "ppo.gamma=1.01", "ppo.gamma: must be in (0, 1], got 1.01"),
    ("rl", "ppo.gae_lambda=-0.1", "ppo.gae_lambda: must be in [0, 1], got -0.1"),
    ("rl", "ppo.clip_eps=0", "ppo.clip_eps: must be > 0, got 0"),
    ("rl", "ppo.total_timesteps=0", "ppo.total_timesteps: must be ≥ 1, got 0"),
    ("rl", "ckpt_every=0", "ckpt_every: must be ≥ 1, got 0"),
    ("rl", "updates_per_log=0", "updates_per_log: must be ≥ 1, got 0"),
    ("rl", "keep=0", "keep: must be ≥ 1, got 0"),
    ("rl", "env.time_limit=0", "env.time_limit: must be > 0, got 0"),
    ("rl", "env.action_repeat=0", "env.action_repeat: must be ≥ 1, got 0"),
    ("rl", "env.laps=0", "env.laps: must be ≥ 1, got 0"),
    ("rl", "env.collision_penalty=-1", "env.collision_penalty: must be ≥ 0, got -1"),
    ("rl", "model.lidar_beams=0", "model.lidar_beams: must be ≥ 1, got 0"),
    ("rl", "imitate.lr=0", "imitate.lr: must be > 0, got 0"),
]


@pytest.mark.parametrize("kind,override,line", RANGES, ids=[o for _, o, _ in RANGES])
def test_out_of_range_value_fails_at_load_naming_the_key(kind, override, line):
    with pytest.raises(configlib.ConfigError) as e:
        LOADERS[kind](None, [override])
    assert str(e.value) == line


def test_ranges_are_checked_when_built_in_code():
    from etl.config import OutputConfig
    from rl.ppo_core import PPOConfig
    from train.config import TrainingConfig

    with pytest.raises(configlib.ConfigError, match=r"^training\.mask_ratio: must be in \(0, 1\)"):
        TrainingConfig(mask_ratio=0.0)
    with pytest.raises(configlib.ConfigError, match=r"^ppo\.gamma: must be in \(0, 1\]"):
        PPOConfig(gamma=2.0)
    with pytest.raises(configlib.ConfigError, match=r"^output\.val_fraction"):
        OutputConfig(val_fraction=-0.1)


RANGE_ENTRY_POINTS = {  # prog -> (argv, the line after "<prog>: config error: ")
    "etl.build": (lambda t: ["--out", str(t / "o"), "--set", "output.val_fraction=2.0"],
                  "output.val_fraction: must be in [0, 1), got 2"),
    "train.pretrain": (lambda t: ["--config", PRE_TINY, "--set", "training.mask_ratio=0"],
                       "training.mask_ratio: must be in (0, 1), got 0"),
    "rl.ppo": (lambda t: ["--set", "ppo.learning_rate=-0.1"],
               "ppo.learning_rate: must be ≥ 0, got -0.1"),
    "rl.imitate": (lambda t: ["--set", "env.action_repeat=0"],
                   "env.action_repeat: must be ≥ 1, got 0"),
    "benchmarks.ppo": (lambda t: ["--set", "ppo.num_envs=0"], "ppo.num_envs: must be ≥ 1, got 0"),
}


@pytest.mark.parametrize("prog", sorted(RANGE_ENTRY_POINTS))
def test_out_of_range_exits_2_with_one_line(prog, tmp_path, capsys):
    argv, line = RANGE_ENTRY_POINTS[prog]
    capsys.readouterr()
    assert _main(prog)(argv(tmp_path)) == configlib.EXIT_CONFIG == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{prog}: config error: {line}"]


def test_patch_size_not_dividing_the_data_exits_2(tmp_path, capsys):
    from _train_fixtures import run_pretrain, tiny_config, write_shards

    data = write_shards(tmp_path / "data", n_train=8, n_val=0, shards=1)  # 32×32 grids
    cfg = tiny_config(tmp_path, data)
    capsys.readouterr()
    assert run_pretrain(["--config", str(cfg), "--set", "model.patch_size=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.pretrain: config error: model.patch_size: must divide the "
                              "lidar size 32×32 of the data in "), err
    assert not (tmp_path / "runs").exists()  # nothing started
