"""The pretraining study's configuration: TOML → typed, frozen dataclasses; the five arms
derived from one base PPO config; the evaluation conditions; where everything lives.

    cfg = load_study("configs/study_cpu.toml")
    arm_config(cfg, "pretrained_finetuned", seed=3)    # an rl.config.RLConfig
    conditions(cfg)                                    # training tracks, faults, unseen tracks
    layout = Layout(cfg)                               # runs/<name>/…

The arms (issue 13, section 3) share the architecture, the budget, the tracks and the seeds;
they differ from ``scratch`` only in the keys of :data:`INIT_KEYS` — how the policy is
initialised and which of its parameters learn at which rate:

========================  ==============  ================  ==================
arm                       finetune.init   freeze_encoders   ppo.encoder_lr_scale
========================  ==============  ================  ==================
scratch                   scratch         false             1 (trained end to end)
pretrained_frozen         pretrained      true              1 (no encoder update)
pretrained_finetuned      pretrained      false             rl.encoder_lr_scale
random_frozen             scratch         true              1 (no encoder update)
========================  ==============  ================  ==================

and the reference ``lidar_mlp``, the PPO issue's lidar MLP: the base config with the
``rl.reference`` overrides, which may change only ``[model]`` keys (it is another policy, so it
differs in ``model.policy`` and its own ``[model]`` settings; everything else is the arms').

Every multimodal arm builds its encoders from the study's pretraining checkpoint
(``finetune.pretrained_ckpt``): its weights for the pretrained arms, its architecture only for
scratch and random_frozen, so all four are the same network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from etl import configlib
from rl.config import RLConfig, load_config

# The arms, in the report's order; scratch is the baseline every other arm is compared with.
ARMS = ("scratch", "pretrained_frozen", "pretrained_finetuned", "random_frozen", "lidar_mlp")
BASELINE = "scratch"
REFERENCE = "lidar_mlp"
# The keys in which a multimodal arm's config differs from scratch's (a test diffs them).
INIT_KEYS = ("finetune.init", "finetune.freeze_encoders", "ppo.encoder_lr_scale")


def arm_keys(arm: str, encoder_lr_scale: float) -> dict[str, object]:
    """The :data:`INIT_KEYS` values of an arm (the reference's are scratch's)."""
    init, freeze, scale = {
        "scratch": ("scratch", False, 1.0),
        "pretrained_frozen": ("pretrained", True, 1.0),
        "pretrained_finetuned": ("pretrained", False, encoder_lr_scale),
        "random_frozen": ("scratch", True, 1.0),
        "lidar_mlp": ("scratch", False, 1.0),
    }[arm]
    return dict(zip(INIT_KEYS, (init, freeze, scale), strict=True))


@dataclass(frozen=True)
class DataSection:
    """``[data]``: what the encoders are pretrained on. ``kind`` is stated in the report
    ("synthetic": etl.synth drives; "cmht": the real dataset). With ``synth_drives`` > 0 the
    study writes that many synthetic drives into ``raw`` (etl.synth) first; with ``raw`` set it
    builds ``cache`` from it (etl.build, resumable); ``cache`` (when set) replaces the
    pretraining config's data.path."""

    kind: Literal["synthetic", "cmht"] = "synthetic"
    cache: str = ""
    raw: str = ""
    synth_drives: int = 0
    synth_frames: int = 60
    synth_seed: int = 0
    etl_config: str = ""  # etl.build --config ("" = defaults)
    etl_set: tuple[str, ...] = ()  # etl.build --set overrides, e.g. ["output.split=drive"]
    etl_workers: int = 1

    def __post_init__(self):
        configlib.check_ranges(self, "data", {"synth_drives": (0, None),
                                              "synth_frames": (1, None),
                                              "etl_workers": (1, None)})  # fmt: skip
        if self.synth_drives and not self.raw:
            raise configlib.ConfigError("data.raw: required when data.synth_drives > 0 "
                                        "(where the synthetic drives are written)")
        if self.raw and not self.cache:
            raise configlib.ConfigError("data.cache: required when data.raw is set "
                                        "(where etl.build writes the dataset)")


@dataclass(frozen=True)
class PretrainSection:
    """``[pretrain]``: the pretraining config (a configs/pretrain_*.toml) and its overrides;
    the run is ``<runs_dir>/<name>/pretrain``. ``probe``: run train.probe on the checkpoint
    (with ``probe_args``). ``domain_gap``: run rl.domain_gap on it (the simulator's BEV next
    to the pretraining data's, on the base RL config's training tracks; ``domain_gap_args``)."""

    config: str = "configs/pretrain_tiny.toml"  # the CPU study names configs/pretrain_cpu.toml
    set: tuple[str, ...] = ()
    probe: bool = True
    probe_args: tuple[str, ...] = ()
    domain_gap: bool = True
    domain_gap_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class RLSection:
    """``[rl]``: the base PPO config every arm derives from (a configs/rl_*.toml, multimodal
    policy) with ``set`` overrides; the fine-tuned arm's encoder learning rate as a fraction of
    the heads'; the reference arm's ``[model]`` overrides."""

    config: str = "configs/rl_study.toml"
    set: tuple[str, ...] = ()
    encoder_lr_scale: float = 0.1
    reference: tuple[str, ...] = ("model.policy=lidar_mlp", "model.hidden=[256, 256]")

    def __post_init__(self):
        configlib.check_range("rl.encoder_lr_scale", self.encoder_lr_scale, 0.0, 1.0,
                              lo_open=True)
        for s in self.reference:
            if not s.strip().startswith("model."):
                raise configlib.ConfigError(f"rl.reference: {s!r}: the reference arm may "
                                            "change [model] keys only (model.<key>=<value>)")


@dataclass(frozen=True)
class EvalSection:
    """``[eval]``: the evaluation protocol of every run (rl.evaluate: grid start, the
    deterministic policy, ``episodes`` × ``time_limit`` s, contacts ending an episode or not).
    Training tracks (``tracks``; "" = the training config's env.track), then without retraining
    the lidar noise × each of ``lidar_noise``, each fraction of ``lidar_drop`` rays dropped and
    the IMU absent — on the first ``robust_tracks`` training tracks — and the ``unseen`` tracks
    (e.g. berlin, montreal and a procedural family the policy never drove)."""

    episodes: int = 5
    time_limit: float = 160.0
    collision: Literal["terminate", "continue"] = "terminate"
    tracks: str = ""
    robust_tracks: int = 1
    lidar_noise: tuple[float, ...] = (2.0, 4.0)
    lidar_drop: tuple[float, ...] = (0.1, 0.3)
    imu_absent: bool = True
    unseen: tuple[str, ...] = ("berlin", "montreal", "procedural:circuit:900-901")

    def __post_init__(self):
        configlib.check_ranges(self, "eval", {"episodes": (1, None),
                                              "time_limit": (0, None, True),
                                              "robust_tracks": (1, None),
                                              "lidar_noise": (0, 100),
                                              "lidar_drop": (0, 1, False, True)})  # fmt: skip


@dataclass(frozen=True)
class ReportSection:
    """``[report]``: bootstrap resamples of the intervals (``reps``; ``curve_reps`` for the
    learning-curve bands, ``curve_points`` points each), the bootstrap's seed, and a folder
    the report (report.md, report.json, figures/) is also copied to ("" = none), e.g.
    benchmarks/results/study_cpu."""

    reps: int = 10_000
    curve_reps: int = 1000
    curve_points: int = 40
    seed: int = 0
    copy_to: str = ""

    def __post_init__(self):
        configlib.check_ranges(self, "report", {"reps": (100, None), "curve_reps": (100, None),
                                                "curve_points": (2, None)})  # fmt: skip


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    runs_dir: str = "runs"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    arms: tuple[str, ...] = ARMS
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    rl: RLSection = field(default_factory=RLSection)
    eval: EvalSection = field(default_factory=EvalSection)
    report: ReportSection = field(default_factory=ReportSection)

    def __post_init__(self):
        configlib.check_literals(self)
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise configlib.ConfigError(f"name: {self.name!r}: letters, digits, '-', '_', '.'")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise configlib.ConfigError(f"seeds: distinct seeds, at least one, got "
                                        f"{list(self.seeds)}")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or len(set(self.arms)) != len(self.arms):
            raise configlib.ConfigError(f"arms: each of {list(ARMS)} at most once, got "
                                        f"{list(self.arms)}")
        if BASELINE not in self.arms:
            raise configlib.ConfigError(f"arms: {BASELINE!r} is the baseline every arm is "
                                        "compared with; it must be one of them")


def load_study(path=None, overrides=()) -> StudyConfig:
    return configlib.load(StudyConfig, path, overrides)


# --------------------------------------------------------------------------- where things are
@dataclass(frozen=True)
class Layout:
    """``<runs_dir>/<name>/``: pretrain/ (its run), ppo/<arm>_s<seed>/ (PPO runs),
    eval/<arm>_s<seed>/<condition>/metrics.json, markers/<unit>.json, report.md, report.json,
    figures/."""

    root: Path

    @classmethod
    def of(cls, cfg: StudyConfig) -> Layout:
        return cls(Path(cfg.runs_dir) / cfg.name)

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def pretrain_ckpt(self) -> Path:
        return self.pretrain / "ckpt"

    @property
    def ppo(self) -> Path:
        return self.root / "ppo"

    def run(self, arm: str, seed: int) -> Path:
        return self.ppo / run_name(arm, seed)

    def eval(self, arm: str, seed: int, condition: str) -> Path:
        return self.root / "eval" / run_name(arm, seed) / condition

    @property
    def markers(self) -> Path:
        return self.root / "markers"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def probe_json(self) -> Path | None:
        """train.probe's report of the pretraining run: ``pretrain/probe/probe.json`` (or, from
        the probe of before its report folder, ``pretrain/probe.json``); None if neither."""
        for p in (self.pretrain / "probe" / "probe.json", self.pretrain / "probe.json"):
            if p.is_file():
                return p
        return None

    @property
    def domain_gap(self) -> Path:
        """rl.domain_gap's report folder for the pretraining run."""
        return self.pretrain / "domain_gap"

    def domain_gap_json(self) -> Path | None:
        p = self.domain_gap / "domain_gap.json"
        return p if p.is_file() else None


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


# --------------------------------------------------------------------------- arms
def base_overrides(cfg: StudyConfig) -> list[str]:
    """What the study sets in every arm: its overrides, where runs go, the checkpoint."""
    lay = Layout.of(cfg)
    return [*cfg.rl.set, f"runs_dir={lay.ppo.as_posix()}",
            f"finetune.pretrained_ckpt={lay.pretrain_ckpt.as_posix()}"]


def arm_overrides(cfg: StudyConfig, arm: str, seed: int) -> list[str]:
    """The ``--set`` overrides of the base PPO config that make arm × seed's config."""
    keys = arm_keys(arm, cfg.rl.encoder_lr_scale)
    sets = [f"{k}={_toml(v)}" for k, v in keys.items()]
    if arm == REFERENCE:
        sets = [*cfg.rl.reference, *sets]
    return [*base_overrides(cfg), *sets, f"seed={seed}", f"run_name={run_name(arm, seed)}"]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def arm_config(cfg: StudyConfig, arm: str, seed: int) -> RLConfig:
    """The PPO config of ``arm`` × ``seed`` (raises :class:`etl.configlib.ConfigError`)."""
    return load_config(cfg.rl.config, arm_overrides(cfg, arm, seed))


def check_base(cfg: StudyConfig) -> RLConfig:
    """The base PPO config, checked for what the study needs; raises ConfigError."""
    base = load_config(cfg.rl.config, base_overrides(cfg))
    if base.model.policy != "multimodal":
        raise configlib.ConfigError(f"rl.config {cfg.rl.config}: model.policy must be "
                                    f"'multimodal' (the arms' policy), got {base.model.policy!r}")
    if base.stages:
        raise configlib.ConfigError(f"rl.config {cfg.rl.config}: no [[stages]] in the study "
                                    "(each arm is one run, its learning curve one metrics.jsonl)")
    return base


def config_diff(a: RLConfig, b: RLConfig) -> dict[str, tuple]:
    """``{dotted key: (a's value, b's value)}`` of every key in which two configs differ."""
    fa, fb = _flatten(configlib.to_dict(a)), _flatten(configlib.to_dict(b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Condition:
    """One evaluation of every run: its ``name`` (a folder), ``group`` (train | robustness |
    unseen), tracks and the sensor faults (rl.evaluate.Perturbation's fields)."""

    name: str
    group: Literal["train", "robustness", "unseen"]
    tracks: tuple[str, ...]
    lidar_noise: float = 1.0
    lidar_drop: float = 0.0
    imu_absent: bool = False


def training_tracks(cfg: StudyConfig, base: RLConfig) -> tuple[str, ...]:
    from rl.tracks import track_names

    return tuple(track_names(cfg.eval.tracks or base.env.track))


def conditions(cfg: StudyConfig, base: RLConfig) -> list[Condition]:
    """The evaluation conditions, in the report's order."""
    train = training_tracks(cfg, base)
    robust = train[: cfg.eval.robust_tracks]
    out = [Condition("train", "train", train)]
    out += [Condition(f"lidar_noise_x{k:g}", "robustness", robust, lidar_noise=k)
            for k in cfg.eval.lidar_noise]
    out += [Condition(f"lidar_drop_{p * 100:g}", "robustness", robust, lidar_drop=p)
            for p in cfg.eval.lidar_drop]
    if cfg.eval.imu_absent:
        out.append(Condition("imu_absent", "robustness", robust, imu_absent=True))
    if cfg.eval.unseen:
        from rl.tracks import track_names

        unseen = tuple(t for s in cfg.eval.unseen for t in track_names(s))
        seen = set(train)
        if seen & set(unseen):
            raise configlib.ConfigError(f"eval.unseen: {sorted(seen & set(unseen))} "
                                        "are training tracks")
        out.append(Condition("unseen", "unseen", unseen))
    return out



# --------------------------------------------------------------------------- units of work
STAGES = ("data", "tracks", "pretrain", "probe", "gap", "train", "evaluate")


@dataclass(frozen=True)
class Unit:
    """One unit of work: done once its completion marker (``markers/<name>.json``) says so.
    ``needs``: the units that must be done first."""

    name: str
    stage: Literal["data", "tracks", "pretrain", "probe", "gap", "train", "evaluate"]
    needs: tuple[str, ...] = ()
    arm: str = ""
    seed: int = -1
    condition: Condition | None = None


def prebuilt_tracks(cfg: StudyConfig, base: RLConfig) -> tuple[str, ...]:
    """The tracks whose maps the ``tracks`` unit builds before any arm trains: with a track
    pool (``env.track_pool``, hundreds or thousands of procedural circuits, ~1-4 CPU-s each)
    every track the runs and their evaluations use — the pool, ``env.track``, every
    condition's — so that a Slurm array's tasks do not each compile the same maps at once;
    without a pool none (each run builds its few maps on first use, as ``rl.ppo`` does)."""
    if not base.env.track_pool:
        return ()
    from rl.tracks import track_names

    names = [*track_names(base.env.track), *track_names(base.env.track_pool)]
    names += [t for c in conditions(cfg, base) for t in c.tracks]
    return tuple(dict.fromkeys(names))  # in order, once each


def units(cfg: StudyConfig, base: RLConfig) -> list[Unit]:
    """Every unit of the study in the order it runs: data, the track pool's maps (if any),
    pretraining, probe, then seed by seed each arm's training and its evaluations (an
    interrupted study has every arm at about the same number of seeds)."""
    out: list[Unit] = []
    data: tuple[str, ...] = ()
    if cfg.data.synth_drives:
        out.append(Unit("data/synth", "data"))
        data = ("data/synth",)
    if cfg.data.raw:
        out.append(Unit("data/etl", "data", data))
        data = ("data/etl",)
    tracks: tuple[str, ...] = ()
    if prebuilt_tracks(cfg, base):
        out.append(Unit("tracks", "tracks"))
        tracks = ("tracks",)
    out.append(Unit("pretrain", "pretrain", data))
    if cfg.pretrain.probe:
        out.append(Unit("probe", "probe", ("pretrain",)))
    if cfg.pretrain.domain_gap:
        out.append(Unit("domain_gap", "gap", ("pretrain",)))
    conds = conditions(cfg, base)
    for seed in cfg.seeds:
        for arm in cfg.arms:
            run = run_name(arm, seed)
            needs = tracks if arm == REFERENCE else ("pretrain", *tracks)
            out.append(Unit(f"train/{run}", "train", needs, arm, seed))
            out += [Unit(f"eval/{run}/{c.name}", "evaluate", (f"train/{run}",), arm, seed, c)
                    for c in conds]
    return out
