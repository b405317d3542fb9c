"""PPO configuration: TOML → typed, frozen dataclasses (see :mod:`etl.configlib`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from etl import configlib
from rl.envs import spec
from rl.ppo_core import PPOConfig


@dataclass(frozen=True)
class RandomizeConfig:
    """``[env.randomize]``: domain randomization of the JAX car (fast runner only), drawn
    uniformly once per episode at its reset from the env's key (reproducible per seed) and held
    for the episode (``rl.envs.jax_env.CarDraw``). Every field perturbs today's car and 0 is no
    perturbation: the defaults are today's car exactly, and a zero field costs nothing (it is
    left out of the compiled step). Relative fields draw a factor 1 + U(-x, +x).

        [env.randomize]
        mass = 0.15                 # accel_max and brake_max / (1 ± 0.15)
        grip = 0.15                 # tyres: slip_gain, brake_slip, tyre_peak × g; ...
        motor_gain = 0.1            # motor force and wheel target speed × (1 ± 0.1)
        steer_gain = 0.1            # wheel angle per unit steering × (1 ± 0.1)
        steer_offset = 0.02         # rad added to the wheel angle, ± 0.02
        yaw_rate_noise = [0.0, 0.025]  # observed yaw-rate noise std = k v², k ~ U(0, 0.025)
        action_delay = 2            # the action applied is the one of d ∈ {0, 1, 2} steps ago
        obs_lag = 0.5               # half the episodes observe one policy step late
        lidar_noise = [-0.03, 0.03]  # multiplicative lidar noise 0.03 + this: 0 ... 0.06
        lidar_dropout = 0.02        # each ray reads max range with probability U(0, 0.02)
    """

    # mass (relative): the motor's force and the brake's torque move a heavier car less —
    # accel_max and brake_max are divided by the factor (the tyre limits, drag are not)
    mass: float = 0.0
    # tyre grip (relative): the tyre-limited terms of rl.envs.jax_env.car_step — longitudinal
    # traction slip_gain × g, locked-wheel braking brake_slip × g, the front tyre's peak
    # lateral force tyre_peak × g (the lateral acceleration where the car saturates scales by
    # g; its cornering stiffness does not) and the braked wheels' grip loss / g. Not
    # wall_friction (the chassis on the wall, not a tyre)
    grip: float = 0.0
    # motor gain (relative): the motor's drive force (accel_max) and its wheel target speed
    # (motor_target; the speed actuator's target) × the factor; not the brake
    motor_gain: float = 0.0
    # steering gain (relative): the wheel-angle target per unit steering action × the factor
    steer_gain: float = 0.0
    # steering offset: rad added to the wheel-angle target, U(-x, x) (a zero steer turns)
    steer_offset: float = 0.0
    # [lo, hi]: k ~ U(lo, hi) added to env.yaw_rate_noise (clipped >= 0): the observed yaw
    # rate's noise std = k v² rad/s (PyBullet's wobbling chassis: ~0.016)
    yaw_rate_noise: tuple[float, float] = (0.0, 0.0)
    # max action delay in physics steps: the car applies the action of d ~ U{0..N} physics
    # steps ago (the commands before the episode's first are 0)
    action_delay: int = 0
    # probability that an episode observes one step late (the previous policy step's
    # observation, as racecar_gym's observations are; the first one is the reset's).
    # 1 = every episode, with no per-car choice: cheaper than 0 < p < 1
    obs_lag: float = 0.0
    # [lo, hi] added to the lidar's multiplicative noise amplitude (spec: 0.03), clipped >= 0
    lidar_noise: tuple[float, float] = (0.0, 0.0)
    # max fraction of dropped rays: an episode draws p ~ U(0, x), each ray of each scan then
    # reads max range (LIDAR_MAX) with probability p
    lidar_dropout: float = 0.0

    def __post_init__(self):
        k = "env.randomize."
        for name in ("mass", "grip", "motor_gain", "steer_gain"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise configlib.ConfigError(f"{k}{name}: a relative range in [0, 1), "
                                            f"got {getattr(self, name)}")
        if not 0.0 <= self.steer_offset <= 0.2:
            raise configlib.ConfigError(f"{k}steer_offset: rad in [0, 0.2], "
                                        f"got {self.steer_offset}")
        for name in ("yaw_rate_noise", "lidar_noise"):
            lo, hi = getattr(self, name)
            if not -1.0 <= lo <= hi <= 1.0:
                raise configlib.ConfigError(f"{k}{name}: [lo, hi] with -1 <= lo <= hi <= 1, "
                                            f"got {[lo, hi]}")
        if not 0 <= self.action_delay <= 50:
            raise configlib.ConfigError(f"{k}action_delay: physics steps in [0, 50], "
                                        f"got {self.action_delay}")
        for name in ("obs_lag", "lidar_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise configlib.ConfigError(f"{k}{name}: a probability in [0, 1], "
                                            f"got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        """Whether anything is randomized (else the car is today's, at no cost)."""
        return self != RandomizeConfig()


@dataclass(frozen=True)
class EnvConfig:
    backend: Literal["jax", "bullet", "racecar_gym"] = "jax"  # jax: fast runner; else gymnasium
    # a name in the racecar_tracks folder, a path, procedural:<seed>; or a comma-separated
    # list ("austria,procedural:1-8": seeds 1..8) to train on all of them at once
    track: str = "procedural:0"
    laps: int = 1
    time_limit: float = 60.0  # simulated seconds; reaching it truncates the episode
    terminate_on_collision: bool = True
    collision_penalty: float = 1.0  # subtracted per policy step touching a wall
    frame_reward: float = 0.0  # per physics step
    # per physics step with the footprint inside the wall_margin band, scaled by the depth
    # (0 at the band's edge, 1 touching): keeping off the walls before touching them
    proximity_penalty: float = 0.0
    wall_margin: float = 0.3  # m
    # end the episode (paying collision_penalty) after stall_time s below stall_speed; 0 = off
    stall_time: float = 0.0
    stall_speed: float = 0.1  # m/s
    # what a stall that ends the episode costs; unset = collision_penalty (a stall is a crash).
    # A stage that makes contacts cheap (collision_penalty 0.25) makes stopping cheap too:
    # set this to keep stopping dearer than driving on
    stall_penalty: float | None = configlib.added(None, "2026-12-06")
    progress_reward: float = 100.0  # × Δ(lap + progress), signed
    reset_mode: Literal["grid", "random"] = "random"
    # the drive action: "motor" (racecar_gym's default: > 0 drives, < 0 brakes, and a braked
    # car barely turns) or "speed" (racecar_gym's speed actuator: a target speed of
    # (a + 1) / 2 × 3.5 m/s); every backend has both
    actuator: Literal["motor", "speed"] = "motor"
    # the speed actuator's top target, m/s, in every backend: the drive action's [-1, 1] asks
    # for 0 ... speed_max (racecar_gym's: 3.5). A cap leaves a margin where the simulators
    # differ most: at full speed PyBullet's car turns less and scrubs speed
    speed_max: float = configlib.added(3.5, "2026-12-06")
    # the speed actuator's lowest target, m/s, in every backend: the drive action's [-1, 1]
    # asks for speed_min ... speed_max, so the policy cannot stop the car (a wall still can).
    # Not env.min_speed, which is the JAX car's physics (neither brake nor coasting below it)
    speed_min: float = configlib.added(0.0, "2026-12-07")
    # JAX backend only: the car model — "kinematic" (the bicycle model; every result before
    # 2026-12-06), "tyre" (a front tyre fitted to PyBullet's cornering at speed:
    # rl.envs.jax_env.TYRE_CAR) or "tyre_lock" (the same, its front tyre losing grip while the
    # speed actuator brakes hard, as PyBullet's does: TYRE_LOCK_CAR; 2026-12-07)
    car: Literal["kinematic", "tyre", "tyre_lock"] = "kinematic"
    action_repeat: int = 4  # physics steps per policy step (100 Hz physics → 25 Hz policy)
    camera: bool = False  # render rgb_camera (needed by a policy that reads rgb)
    # JAX backend only: rays actually cast (1080 = racecar_gym's scan; 108 = every 10th ray,
    # ~10× less lidar work, what the lidar MLP's 108 sectors need at minimum)
    lidar_rays: int = 1080
    # JAX backend only: noise on the observed yaw rate, std = this × speed² (rad/s); PyBullet's
    # chassis wobbles at speed (measured ~0.016: 0.10 rad/s at 2.3 m/s, 0.22 at 3.8)
    yaw_rate_noise: float = 0.0
    # JAX backend only: a speed floor, m/s (0 = off). Neither the brake nor coasting slows the
    # car below it once it is faster (a wall still can): stopping is not an option. A car
    # below it (at the start, after a wall) is not pushed up; env.stall_time still ends it
    min_speed: float = 0.0
    # JAX backend only: per-episode domain randomization of the car and its sensors
    randomize: RandomizeConfig = field(default_factory=RandomizeConfig)
    # JAX backend only: a pool of training tracks beside env.track — every pool_every updates
    # pool_size of them are drawn anew (seeded by the run's seed and the draw's number) and
    # tiled with env.track's into one map of fixed slots of pool_slot_m metres (no recompile);
    # every car restarts on the new map. "" = off. E.g. "procedural:circuit:0-9999"
    track_pool: str = ""
    pool_size: int = 16
    pool_every: int = 50  # updates
    pool_slot_m: float = 64.0
    world_scale: float = 10.0  # sim metres → real-car metres, for the observation adapter
    bullet_workers: int = 0  # gymnasium runner: 0 = envs in this process, else subprocesses

    def __post_init__(self):
        if not 0.0 <= self.min_speed <= 3.0:
            raise configlib.ConfigError(f"env.min_speed: m/s in [0, 3], got {self.min_speed}")
        if self.stall_penalty is not None and self.stall_penalty < 0:
            raise configlib.ConfigError(f"env.stall_penalty: >= 0 (a cost), got "
                                        f"{self.stall_penalty}")
        if not 0.0 < self.speed_max <= 3.5:
            raise configlib.ConfigError(f"env.speed_max: m/s in (0, 3.5], got {self.speed_max}")
        if self.speed_max != 3.5 and self.actuator != "speed":
            raise configlib.ConfigError("env.speed_max caps the speed actuator: set "
                                        f"env.actuator = \"speed\" (got {self.actuator!r})")
        if not 0.0 <= self.speed_min < self.speed_max:
            raise configlib.ConfigError(f"env.speed_min: m/s in [0, env.speed_max = "
                                        f"{self.speed_max}), got {self.speed_min}")
        if self.speed_min != 0.0 and self.actuator != "speed":
            raise configlib.ConfigError("env.speed_min is a floor of the speed actuator: set "
                                        f"env.actuator = \"speed\" (got {self.actuator!r})")
        configlib.check_ranges(self, "env", {
            "laps": (1, None), "time_limit": (0, None, True), "action_repeat": (1, None),
            "collision_penalty": (0, None), "proximity_penalty": (0, None),
            "wall_margin": (0, None), "stall_time": (0, None), "stall_speed": (0, None),
            "lidar_rays": (1, None), "yaw_rate_noise": (0, None),
            "world_scale": (0, None, True), "bullet_workers": (0, None),
            "pool_size": (1, None), "pool_every": (1, None), "pool_slot_m": (0, None, True),
        })  # fmt: skip
        if self.track_pool and self.backend != "jax":
            raise configlib.ConfigError(f"env.track_pool: the JAX backend's (fast runner), "
                                        f"not {self.backend!r}")
        if self.track_pool:
            from rl.tracks import TrackError, track_names

            try:
                n = len(track_names(self.track_pool))
            except TrackError as e:
                raise configlib.ConfigError(f"env.track_pool: {e}") from e
            if self.pool_size > n:
                raise configlib.ConfigError(f"env.pool_size: {self.pool_size} tracks from a "
                                            f"pool of {n} ({self.track_pool})")


@dataclass(frozen=True)
class ModelConfig:
    policy: Literal["lidar_mlp", "multimodal"] = "lidar_mlp"
    hidden: tuple[int, ...] = (256, 256)
    lidar_beams: int = 108  # the lidar MLP's input: every (1080 / lidar_beams)-th ray
    # and the body-frame velocity's components: "planar" (vx, vy, yaw rate) or "all" six (the
    # recipes measured before 2026-12-06 used "all"; rl.agent.VELOCITY_COMPONENTS says why
    # not any more)
    velocity: Literal["planar", "all"] = "planar"
    # the lidar MLP also reads the previous policy step's scan (its lidar_beams rays) and the
    # action it took then: two frames stacked and the previous action, issue 12's lever (the
    # environment carries them: rl.envs.jax_env.SensorConfig.history, rl.envs.wrappers.History).
    # Needs env.action_repeat = the lidar's period (4 physics steps), so that "the scan before
    # this one" and "the scan the policy saw last step" are the same scan in every backend.
    history: bool = configlib.added(False, "2026-12-07")
    modalities: tuple[str, ...] = ("lidar", "gps", "imu")  # multimodal policy's inputs
    # multimodal policy: the lidar BEV's patches its encoder sees — the lidar_tokens patches
    # with the most points (ObservationAdapter.jax_patches; the pretraining's encoder sees a
    # random subset too, its visible patches), or 0: every patch of the full BEV
    lidar_tokens: int = 0
    # multimodal policy: the car's own motion beside the encoders' pooled features, straight
    # into the policy and value heads — "planar": the body-frame vx, vy and yaw rate (the lidar
    # MLP's model.velocity = "planar"; what wheel odometry and a gyro give a real car). The
    # IMU modality carries the gyro and accelerometer only, so without it the policy cannot
    # tell its own speed. "none": the heads see the features alone (before 2026-12-07).
    proprio: Literal["none", "planar"] = configlib.added("none", "2026-12-07")
    # multimodal policy: standardize each dimension of the encoders' pooled features with its
    # mean and std over the states of a first rollout (rl.factory.fit_feature_norm), fixed
    # for the run and saved with it, so the heads see the few-percent differences between
    # states rather than the features' common offset (the lidar MLP's ppo.norm_obs does this
    # for its inputs). JAX backend only. false: the features as pooled (before 2026-12-07).
    feature_norm: bool = configlib.added(False, "2026-12-07")
    # multimodal policy: how the heads read the fused tokens — "mean": their mean, one
    # embed_dim vector (before 2026-12-07); "grid": each token in its own place (the lidar's
    # at its BEV patch), each projected to grid_channels numbers by a trained Dense and the
    # map flattened, so the heads know where the walls are (rl.agent.MultimodalActorCritic)
    pooling: Literal["mean", "grid"] = configlib.added("mean", "2026-12-07")
    grid_channels: int = configlib.added(4, "2026-12-07")

    def __post_init__(self):
        configlib.check_ranges(self, "model", {"hidden": (1, None), "lidar_beams": (1, None),
                                               "lidar_tokens": (0, None),
                                               "grid_channels": (1, None)})


@dataclass(frozen=True)
class FinetuneConfig:
    # "scratch": the same architecture, random weights
    init: Literal["pretrained", "scratch"] = "scratch"
    pretrained_ckpt: str = ""  # runs/<pretrain run>/ckpt (latest step)
    pretrain_config: str = ""  # the pretraining TOML; "" = the config saved in the checkpoint
    freeze_encoders: bool = True  # no gradients and no optimizer state for encoders + fusion
    # radar/ir in the simulator: "zeros" (masked out) | "token" (learned)
    absent: Literal["zeros", "token"] = "zeros"
    # warm start: the policy (and observation statistics) of another PPO run's checkpoint,
    # runs/<run>/ckpt, latest step; fresh optimizer, reward statistics and environments. For
    # training in stages (e.g. first contacts allowed, then contacts end the episode). The
    # [model] section must match the checkpoint's. Ignored when this run resumes.
    init_policy: str = ""


@dataclass(frozen=True)
class TeacherConfig:
    """``[imitate.teacher]``: the keywords :func:`rl.drivers.line_driver` passes on to the teacher,
    :class:`rl.drivers.LineFollower`'s and its :func:`rl.plan.speed_profile`'s, with their
    defaults (tests/test_imitate.py keeps the two in step)."""

    lookahead: float = 0.7  # m, pure pursuit's lookahead from the rear axle at standstill
    lookahead_per_mps: float = 0.15  # m more per m/s of speed
    speed_scale: float = 1.0  # × the speed profile
    gain: float = 2.0  # the motor's P-gain on the speed error
    v_max: float = 3.5  # m/s, the speed profile's cap
    a_lat: float = 2.5  # m/s², cornering limit
    a_brake: float = 2.0  # m/s²
    a_accel: float = 2.5  # m/s²


@dataclass(frozen=True)
class ImitateConfig:
    """``python -m rl.imitate``: DAgger of the line follower (:mod:`rl.plan`) into the lidar
    MLP — ``rounds`` in the JAX backend (round 0: the teacher drives), then ``bullet_rounds``
    in which the student drives PyBullet cars. See :mod:`rl.imitate`."""

    rounds: int = 8
    envs: int = 256  # JAX rounds: cars
    steps: int = 256  # JAX rounds: policy steps per car
    epochs: int = 10  # of the fit after every round
    noise: float = 0.2  # std of the student's action noise while it drives
    clearance: float = 0.15  # m, the teacher's planned line from the walls
    turn_radius: float = 0.0  # m, the teacher's line's tightest turn; 0 = the car's (1.75 m)
    # the teacher's LineFollower / speed-profile settings, e.g. {speed_scale = 0.85, a_lat = 1.8}
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lr: float = 1e-3  # Adam's learning rate of the fit
    batch: int = 1024  # minibatch of the fit
    max_samples: int = 1_000_000  # the JAX rounds' data set keeps the newest this many states
    bullet_rounds: int = 0
    bullet_envs: int = 2  # PyBullet cars (one process each when more than one)
    bullet_steps: int = 1000  # policy steps per car a round
    bullet_noise: float | None = None  # None: noise
    bullet_weight: int = 8  # times each PyBullet state counts in the fit

    def __post_init__(self):
        configlib.check_ranges(self, "imitate", {
            "rounds": (0, None), "envs": (1, None), "steps": (1, None), "epochs": (1, None),
            "noise": (0, None), "clearance": (0, None), "turn_radius": (0, None),
            "lr": (0, None, True), "batch": (1, None), "max_samples": (1, None),
            "bullet_rounds": (0, None), "bullet_envs": (1, None), "bullet_steps": (1, None),
            "bullet_weight": (1, None),
        })  # fmt: skip


@dataclass(frozen=True)
class StageConfig:
    """``[[stages]]``: a curriculum stage trained before the run itself — the run's config
    with ``env`` keys replaced, for ``total_timesteps`` policy steps; the next stage (and
    finally the run) starts from its policy and observation statistics (a warm start, as
    ``finetune.init_policy``: fresh optimizer, reward statistics and environments). E.g.
    contacts allowed first, then contacts ending the episode. See :func:`stage_config`."""

    name: str
    total_timesteps: int
    env: dict[str, Any] = field(default_factory=dict)  # [env] keys this stage changes

    def __post_init__(self):
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise configlib.ConfigError(f"stages: name {self.name!r}: letters, digits, _ or -")
        if self.total_timesteps < 1:
            raise configlib.ConfigError(f"stages.{self.name}.total_timesteps: must be ≥ 1")


@dataclass(frozen=True)
class RLConfig:
    run_name: str = "ppo"
    runs_dir: str = "runs"
    seed: int = 0
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    imitate: ImitateConfig = field(default_factory=ImitateConfig)
    updates_per_log: int = 10  # PPO updates per jitted chunk (fast runner) / per log line
    ckpt_every: int = 50  # updates
    keep: int = 3
    # curriculum stages trained first, in order, each in runs/<run>/stages/<i>-<name>
    stages: tuple[StageConfig, ...] = ()

    def __post_init__(self):
        configlib.check_literals(self)  # env.backend, …: also when built in code, not loaded
        configlib.check_ranges(self, "", {"updates_per_log": (1, None), "ckpt_every": (1, None),
                                          "keep": (1, None)})  # fmt: skip
        for i in range(len(self.stages)):
            stage_config(self, i)  # the stage's [env] keys are EnvConfig's, valid values
        if self.finetune.init == "pretrained" and not self.finetune.pretrained_ckpt:
            raise configlib.ConfigError(
                "finetune.pretrained_ckpt: required when init = 'pretrained'"
            )
        if (
            self.model.policy == "multimodal"
            and "rgb" in self.model.modalities
            and not self.env.camera
        ):
            raise configlib.ConfigError("model.modalities: 'rgb' needs env.camera = true")
        if self.model.history:
            if self.model.policy != "lidar_mlp":
                raise configlib.ConfigError("model.history: the lidar MLP's input only, not "
                                            f"model.policy = {self.model.policy!r}")
            if self.env.action_repeat != spec.LIDAR_PERIOD:
                raise configlib.ConfigError(
                    f"model.history: needs env.action_repeat = {spec.LIDAR_PERIOD} (the lidar's "
                    f"period, so each policy step sees a new scan), got {self.env.action_repeat}")
        b = self.ppo.num_envs * self.ppo.num_steps
        if b % self.ppo.num_minibatches:
            raise configlib.ConfigError(
                f"ppo.num_minibatches: {self.ppo.num_minibatches} does not divide "
                f"num_envs × num_steps = {b}"
            )


def stage_config(cfg: RLConfig, i: int) -> RLConfig:
    """The config that trains stage ``i`` of ``cfg.stages``: ``cfg`` with the stage's
    ``env`` keys and step budget, in ``runs/<run>/stages/<i>-<name>``, warm-started from the
    previous stage (the first from ``finetune.init_policy``, "" = from scratch), no stages."""
    st = cfg.stages[i]
    env = configlib.to_dict(cfg.env)
    unknown = sorted(set(st.env) - set(env))
    if unknown:
        raise configlib.ConfigError(f"stages.{st.name}.env: unknown keys {unknown}")
    env = configlib.from_dict(EnvConfig, {**env, **st.env}, prefix="env")
    prev = (stage_dir(cfg, i - 1) / "ckpt").as_posix() if i else cfg.finetune.init_policy
    return replace(cfg, run_name=f"{cfg.run_name}/stages/{i}-{st.name}", env=env,
                   ppo=replace(cfg.ppo, total_timesteps=st.total_timesteps),
                   finetune=replace(cfg.finetune, init_policy=prev), stages=())


def stage_dir(cfg: RLConfig, i: int) -> Path:
    return Path(cfg.runs_dir) / cfg.run_name / "stages" / f"{i}-{cfg.stages[i].name}"


def after_stages(cfg: RLConfig) -> RLConfig:
    """The run itself once its stages are trained: warm-started from the last one."""
    if not cfg.stages:
        return cfg
    last = (stage_dir(cfg, len(cfg.stages) - 1) / "ckpt").as_posix()
    return replace(cfg, finetune=replace(cfg.finetune, init_policy=last))


def pool_draw(cfg: RLConfig, draw: int) -> list[str]:
    """The tracks of the track pool's ``draw``-th draw (``env.track_pool``): env.track's
    tracks, then ``env.pool_size`` names from the pool without replacement, seeded by the
    run's seed and the draw's number (the same names on a resume)."""
    from rl.tracks import track_names

    fixed, pool = track_names(cfg.env.track), track_names(cfg.env.track_pool)
    if cfg.env.pool_size > len(pool):
        raise configlib.ConfigError(f"env.pool_size: {cfg.env.pool_size} tracks from a pool of "
                                    f"{len(pool)} ({cfg.env.track_pool})")
    rng = np.random.default_rng([cfg.seed, draw])
    return fixed + [pool[i] for i in rng.choice(len(pool), cfg.env.pool_size, replace=False)]


def load_config(path=None, overrides=()) -> RLConfig:
    return configlib.load(RLConfig, path, overrides)


def cli_config(prog: str, path=None, overrides=()) -> RLConfig | None:
    """load_config for a command line (:func:`etl.configlib.cli_load`): a config error is
    printed as one line naming the key (``prog: config error: …``) and None returned (the
    caller exits with :data:`etl.configlib.EXIT_CONFIG`, 2)."""
    return configlib.cli_load(prog, RLConfig, path, overrides)
