"""The one place that turns an :class:`rl.config.RLConfig` into things: the task, the
environments of every backend, the agent with its featurizer, the runner — and back from a
checkpoint to a policy.

    task_config(cfg)            the racing task (reward, termination, resets)
    make_sim / make_functional  the JAX simulator; as the fast runner's functional env
    make_env / make_vector_env  one physics-rate host env (bullet | racecar_gym | jax);
                                N of them with the action repeat, for the gymnasium runner
    make_agent(cfg)             (model, featurize, trainable filter) of the configured policy
    make_runner(cfg)            the backend's runner (rl.runners)
    restore_policy / warm_start_policy   a PPO checkpoint's policy (newest intact step)

Entry points (rl.ppo, rl.evaluate, rl.imitate, benchmarks) build through here and nowhere
else, so that every one of them sees the same car, sensors and task for the same config.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from etl import configlib
from etl.config import PreprocessConfig
from rl.agent import (
    VELOCITY_COMPONENTS,
    MLPActorCritic,
    MultimodalActorCritic,
    lidar_feature_dim,
    lidar_features,
    proprio_features,
    split_agent,
)
from rl.config import RandomizeConfig, RLConfig, pool_draw
from rl.envs import jax_env, spec
from rl.envs.adapter import ObservationAdapter
from rl.envs.functional import RacecarFunctional
from rl.envs.jax_env import (
    JaxRacecar,
    JaxRacecarEnv,
    SensorConfig,
    TrackParams,
    make_params,
)
from rl.envs.spec import TaskConfig
from rl.envs.wrappers import ActionRepeat, History
from rl.ppo_core import RunningMeanStd
from rl.runners import FastRunner, GymRunner
from rl.tracks import track_names
from train.checkpoint import (
    ArchitectureMismatch,
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    abstract,
    reason_line,
)
from train.config import load_pretrain_config
from train.mae import MultimodalMAE
from train.pretrain import load_trained

Runner = FastRunner | GymRunner


# --------------------------------------------------------------------------- task
def task_config(cfg: RLConfig) -> TaskConfig:
    """The racing task of ``[env]``: rewards, what ends an episode, where cars start."""
    e = cfg.env
    return TaskConfig(
        laps=e.laps,
        time_limit=e.time_limit,
        terminate_on_collision=e.terminate_on_collision,
        progress_reward=e.progress_reward,
        collision_reward=-e.collision_penalty,
        frame_reward=e.frame_reward,
        proximity_reward=-e.proximity_penalty,
        wall_margin=e.wall_margin,
        stall_time=e.stall_time,
        stall_speed=e.stall_speed,
        stall_reward=None if e.stall_penalty is None else -e.stall_penalty,
        reset_mode=e.reset_mode,
        observe_camera=e.camera,
        actuator=e.actuator,
        car=e.car,
        speed_max=e.speed_max,
        speed_min=e.speed_min,
    )


# --------------------------------------------------------------------------- environments
def make_sim(task: TaskConfig, randomize: RandomizeConfig | None = None, min_speed: float = 0.0,
             **sensors) -> JaxRacecar:
    """The pure-JAX simulator for ``task``: the default car (with a speed floor of
    ``min_speed`` m/s, 0 = none), the default sensors but for the
    :class:`rl.envs.jax_env.SensorConfig` fields given (``camera``, ``lidar_rays``, …), and the
    per-episode domain randomization ``randomize`` (``[env.randomize]``; None = none)."""
    return JaxRacecar(task, jax_env.car(task.car, min_speed=min_speed, actuator=task.actuator),
                      SensorConfig(**sensors),
                      randomize or RandomizeConfig())


def make_functional(cfg: RLConfig, featurize) -> tuple[RacecarFunctional, TrackParams]:
    """The JAX backend as the fast runner steps it (action repeat, auto-reset, ``featurize``
    applied to each observation), and its track parameters (one track, or a list tiled
    into one map)."""
    e = cfg.env
    sim = make_sim(task_config(cfg), e.randomize, e.min_speed, camera=e.camera,
                   lidar_rays=e.lidar_rays, yaw_rate_noise=e.yaw_rate_noise,
                   history=cfg.model.history)
    params = pool_params(cfg, 0) if e.track_pool else make_params(e.track)
    return RacecarFunctional(sim, featurize, e.action_repeat), params


def pool_params(cfg: RLConfig, draw: int) -> TrackParams:
    """The track parameters of the track pool's ``draw``-th draw (:func:`rl.config.pool_draw`):
    the same array shapes for every draw (fixed slots), so the fast runner swaps them in
    without recompiling."""
    names = pool_draw(cfg, draw)
    return make_params(names, slot_m=cfg.env.pool_slot_m, slots=len(names))


def make_env(backend: str, track, task: TaskConfig, camera: bool = False) -> gym.Env:
    """One physics-rate environment of ``backend`` (racecar_gym's gymnasium API) on ``track``
    (a name, path, ``procedural:…``; bullet and jax also take a :class:`rl.tracks.Track`)."""
    if backend == "bullet":
        from rl.envs.bullet import BulletRacecarEnv  # PyBullet: loaded only when asked for

        return BulletRacecarEnv(track, task, camera=camera, actuator=task.actuator)
    if backend == "racecar_gym":
        from rl.envs.racecar_gym_env import make_racecar_gym_env  # optional dependency

        name = track if isinstance(track, str) else track.name
        return make_racecar_gym_env(name, task, camera=camera, actuator=task.actuator)
    if backend == "jax":
        return JaxRacecarEnv(track, task, sensors=SensorConfig(camera=camera))
    raise ValueError(f"unknown backend {backend!r} (jax | bullet | racecar_gym)")


def _env_fn(cfg: RLConfig, track: str):
    task = task_config(cfg)
    def make():
        env = ActionRepeat(make_env(cfg.env.backend, track, task, cfg.env.camera),
                           cfg.env.action_repeat)
        return History(env) if cfg.model.history else env

    return make


def make_vector_env(cfg: RLConfig, num_envs: int, track: str | None = None):
    """``num_envs`` host envs of ``env.backend`` with the action repeat and episode
    statistics, same-step autoreset; a track list ("a,b,procedural:1-4") gives env i track
    i mod n. ``env.bullet_workers`` > 0: one process per env (forkserver: forking a process
    that runs JAX's thread pool is unsafe)."""
    names = track_names(track or cfg.env.track)
    fns = [_env_fn(cfg, names[i % len(names)]) for i in range(num_envs)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if cfg.env.bullet_workers > 0:
        return gym.vector.AsyncVectorEnv(fns, context="forkserver", autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


# --------------------------------------------------------------------------- agents
def make_agent(cfg: RLConfig, seed: int | None = None):
    """(model, featurize, trainable filter) of ``model.policy``. ``featurize`` maps ONE raw
    observation to the model's input (the runners vmap it)."""
    rngs = nnx.Rngs(cfg.seed if seed is None else seed)
    if cfg.model.policy == "lidar_mlp":
        beams = cfg.model.lidar_beams
        vel = cfg.model.velocity
        hist = cfg.model.history
        model = MLPActorCritic(lidar_feature_dim(beams, vel, hist), 2, cfg.model.hidden,
                               cfg.ppo.init_log_std, rngs=rngs)
        return (model, (lambda obs: lidar_features(obs, beams, velocity=vel, history=hist)),
                nnx.Param)
    return _multimodal_agent(cfg, rngs)


def _multimodal_agent(cfg: RLConfig, rngs: nnx.Rngs):
    """The multimodal policy: ``init = "pretrained"`` restores encoders + fusion from
    ``finetune.pretrained_ckpt``; ``"scratch"`` builds the same architecture (from that
    checkpoint's saved config, or ``finetune.pretrain_config``) with random weights, so the
    two compare fairly. ``featurize`` is the observation adapter (the ETL contract)."""
    ft = cfg.finetune
    if ft.init == "pretrained":
        mae, pcfg, pre, _ = load_trained(ft.pretrained_ckpt)
    elif ft.pretrained_ckpt:
        _, pcfg, pre, _ = load_trained(ft.pretrained_ckpt)  # architecture only
        mae = MultimodalMAE(pcfg.model, pre, rngs=rngs)
    elif ft.pretrain_config:
        pcfg = load_pretrain_config(ft.pretrain_config)
        pre = PreprocessConfig()
        mae = MultimodalMAE(pcfg.model, pre, rngs=rngs)
    else:
        raise configlib.ConfigError(
            "finetune: the multimodal policy needs pretrained_ckpt or pretrain_config "
            "(the architecture to build)"
        )
    modalities = tuple(cfg.model.modalities)
    missing = [m for m in modalities if m not in pcfg.model.modalities]
    if missing:
        raise configlib.ConfigError(
            f"model.modalities: {missing} not in the pretrained model's {pcfg.model.modalities}"
        )
    if ft.absent == "token":
        if pcfg.model.absent != "token":
            raise configlib.ConfigError(
                "finetune.absent: 'token' needs a model pretrained with model.absent = 'token' "
                f"(this one has {pcfg.model.absent!r})"
            )
        modalities = tuple(
            m for m in pcfg.model.modalities if m in modalities or m in ("radar", "ir")
        )
    proprio = cfg.model.proprio
    model = MultimodalActorCritic(
        mae, modalities, 2, cfg.model.hidden, cfg.ppo.init_log_std,
        proprio_dim=0 if proprio == "none" else len(VELOCITY_COMPONENTS[proprio]),
        feature_norm=cfg.model.feature_norm, pooling=cfg.model.pooling,
        grid_channels=cfg.model.grid_channels, rngs=rngs,
    )
    adapter = ObservationAdapter(pre, world_scale=cfg.env.world_scale)
    featurize = adapter.jax
    k = cfg.model.lidar_tokens
    if k and "lidar" in modalities:
        n = mae.encoders["lidar"].n_patches
        if k > n:
            raise configlib.ConfigError(
                f"model.lidar_tokens: {k} > the {n} patches of the lidar BEV")
        p = pcfg.model.patch_size
        reads = {"present", *modalities}

        def featurize(obs):  # the sparse lidar, and only the keys the model reads
            out = adapter.jax_patches(obs, p, k)
            return {key: v for key, v in out.items() if key in reads or key.startswith("lidar_")}
    if proprio != "none":
        sensors = featurize

        def featurize(obs):  # ONE observation; the car's motion rides beside the sensors
            return {**sensors(obs), "proprio": proprio_features(obs, proprio)}
    trained = nnx.Not(nnx.PathContains("decoder"))
    if ft.freeze_encoders:
        trained = nnx.Not(nnx.PathContains("mae"))
    return model, featurize, nnx.All(nnx.Param, trained)


# --------------------------------------------------------------------------- runners
def device_mesh(num_envs: int) -> jax.sharding.Mesh | None:
    """A 1-D ``data`` mesh over every device when the envs split evenly over them."""
    n = jax.device_count()
    if n > 1 and num_envs % n == 0:
        return jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return None


def make_runner(cfg: RLConfig, fit_norm: bool = True) -> Runner:
    """The fast runner for the JAX backend, the gymnasium runner for the host backends.
    ``fit_norm=False``: ``model.feature_norm``'s statistics are left unfitted, for a run whose
    policy (with its fitted statistics) comes from a checkpoint: a resume or a warm start."""
    model, featurize, trainable = make_agent(cfg)
    if cfg.env.backend == "jax":
        mesh = device_mesh(cfg.ppo.num_envs)
        if cfg.model.policy == "multimodal":
            # the observation adapter (a BEV per observation) runs in the runner, once per
            # step; frozen encoders: their features are computed once per step and reused
            env, params = make_functional(cfg, lambda obs: obs)
            if cfg.model.feature_norm and fit_norm:
                n = cfg.ppo.num_steps  # a first rollout of the run's own size
                fit_feature_norm(model, featurize, env, params, jax.random.PRNGKey(cfg.seed),
                                 num_envs=cfg.ppo.num_envs, steps=n, every=max(1, n // 16))
            return FastRunner(env, model, cfg.ppo, trainable, mesh=mesh, env_params=params,
                              featurize=featurize)
        env, params = make_functional(cfg, featurize)
        return FastRunner(env, model, cfg.ppo, trainable, mesh=mesh, env_params=params)
    if cfg.model.policy == "multimodal" and cfg.model.feature_norm:
        raise configlib.ConfigError(
            f"model.feature_norm: fitted in the JAX backend only, not env.backend = "
            f"{cfg.env.backend!r} (train there and evaluate anywhere)")
    envs = make_vector_env(cfg, cfg.ppo.num_envs)
    to_env = functools.partial(spec.action_dict, actuator=cfg.env.actuator)
    return GymRunner(envs, model, cfg.ppo, jax.vmap(featurize), to_env, trainable,
                     spec.EPISODE_KEYS, seed=cfg.seed)


def fit_feature_norm(model: MultimodalActorCritic, featurize, env, env_params, key: jax.Array,
                     num_envs: int = 256, steps: int = 64, every: int = 4) -> dict:
    """Set ``model``'s :class:`rl.agent.FeatureStats` (``model.feature_norm``) to the mean and
    std of its pooled features over a first rollout: ``num_envs`` cars from the task's starts,
    driven ``steps`` policy steps by the untrained policy itself (its Gaussian, clipped),
    features taken every ``every`` steps — moving cars, so the IMU's share varies as in
    training, not only cars at rest (:func:`make_runner`: the run's ``num_envs`` ×
    ``num_steps``, every ``num_steps // 16``-th step). A dimension that does not vary gets
    std 1 (left as it is). Returns ``{"mean", "std", "samples"}`` (numpy); deterministic in
    ``key``."""
    graphdef, state = nnx.split(model)
    feat = jax.vmap(featurize)

    @jax.jit
    def run(state, key):
        m = nnx.merge(graphdef, state)
        k_reset, k_run = jax.random.split(key)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_reset, num_envs), env_params)

        def step(carry, k):
            obs, env_state = carry
            x = feat(obs)
            z = m.pooled(x)  # the encoders once: for the stats and for the policy's action
            mean, log_std, _ = m.heads(m.features_from_pooled(z, x))
            k_act, k_env = jax.random.split(k)
            action = jnp.clip(mean + jnp.exp(log_std) * jax.random.normal(k_act, mean.shape),
                              -1.0, 1.0)
            obs, env_state, *_ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_env, num_envs), env_state, action, env_params)
            return (obs, env_state), z

        _, z = jax.lax.scan(step, (obs, env_state), jax.random.split(k_run, steps))
        return z[::every].reshape(-1, z.shape[-1])

    z = np.asarray(run(state, key), np.float64)
    mu, sd = z.mean(0), z.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    model.feature_mean[...] = jnp.asarray(mu, jnp.float32)
    model.feature_std[...] = jnp.asarray(sd, jnp.float32)
    return {"mean": mu, "std": sd, "samples": len(z)}


# --------------------------------------------------------------------------- checkpoints
def saved_state_keys(state_dir: Path) -> list[str]:
    """The top-level keys of a checkpoint's saved ``state`` item (read from its metadata)."""
    meta = ocp.StandardCheckpointer().metadata(state_dir)
    return list(meta.item_metadata.tree.keys())


def _upgrade_record(rl: dict) -> dict:
    """A saved config from before a key existed, read as what that run did: a lidar MLP
    saved without ``model.velocity`` observed all six velocity components."""
    model = rl.get("model", {})
    if "velocity" not in model and model.get("policy", "lidar_mlp") == "lidar_mlp":
        rl = {**rl, "model": {**model, "velocity": "all"}}
    return rl


def check_resume_architecture(cfg: RLConfig, ckpt: Checkpointer) -> None:
    """Before a run resumes: the [model] section saved in its newest readable checkpoint must
    be this config's. Raises :class:`train.checkpoint.ArchitectureMismatch`, one line naming
    every differing key (a damaged step is skipped here; restoring reports it)."""
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            rec = ckpt.saved_config(step)
        except Exception:  # damaged: Checkpointer.restore skips it with a warning, or fails
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("rl"), dict):
            return  # not a PPO record: restoring reports what it is
        saved = _upgrade_record(rec["rl"]).get("model", {})
        now = configlib.to_dict(cfg.model)
        diff = [f"model.{k}: checkpoint {saved.get(k, '<absent>')!r} ≠ config "
                f"{now.get(k, '<absent>')!r}"
                for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diff:
            raise ArchitectureMismatch(
                f"{ckpt.directory} (step {step}) was written for another [model]: "
                + "; ".join(diff) + " (use its [model] settings, or a new run_name)")
        return


def restore_policy(ckpt_dir: str | Path, step: int | None = None):
    """(config, model, obs_rms) of a PPO checkpoint: :func:`restore_policy_step` without the
    step it was read from."""
    return restore_policy_step(ckpt_dir, step)[:3]


def restore_policy_step(ckpt_dir: str | Path, step: int | None = None):
    """(config, model, obs_rms, step) of a PPO checkpoint.

    Restores only the policy — its parameters, the rest of the model where the checkpoint
    has it, and the observation statistics — so no simulator is built and checkpoints stay
    loadable when a simulator's internal state changes between versions.

    Without ``step``: the newest *intact* step, as a resumed run takes it — a step that
    cannot be read (a truncated chunk or metadata file, a missing manifest) is skipped with
    one :class:`train.checkpoint.CheckpointWarning` naming it and why. Unlike a resume, the
    damaged folder is left as it is: evaluation and warm starts read runs they do not own
    (one may still be training, or be read by others), and setting a damaged step aside
    (``<step>.corrupt``) is that run's own resume's business. With ``step``: that step, or a
    :class:`train.checkpoint.CheckpointError`. Where no step can be read: a
    :class:`CheckpointError`, one line naming the folder. A checkpoint that is not a PPO
    one is a ValueError; a config that no longer loads, a ConfigError."""
    ckpt = Checkpointer(ckpt_dir)
    try:
        steps = [step] if step is not None else sorted(ckpt.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
        skipped: list[tuple[int, str]] = []
        for s in steps:
            try:
                rec = ckpt.saved_config(s)
            except Exception as e:  # a damaged step: the one before it, if any
                skipped.append((s, reason_line(e)))
                continue
            if not isinstance(rec, dict) or rec.get("kind") != "ppo":
                raise ValueError(f"{ckpt_dir}: not a PPO checkpoint")
            cfg = configlib.from_dict(RLConfig, _upgrade_record(rec["rl"]))
            model, _, trainable = make_agent(cfg)
            agent = split_agent(model, trainable)
            try:
                out = _restore_policy_state(ckpt, s, cfg, agent)
            except Exception as e:
                skipped.append((s, reason_line(e)))
                continue
            if skipped:
                what = "; ".join(f"step {k}: {why}" for k, why in skipped)
                warnings.warn(f"{ckpt.directory}: damaged checkpoint skipped ({what}); using "
                              f"step {s} (the damaged folder is left as it is)",
                              CheckpointWarning, stacklevel=2)
            frozen = out.get("frozen", agent.frozen)
            model = nnx.merge(agent.graphdef, out["params"], frozen)
            return cfg, model, out.get("obs_rms"), s
        if step is not None:
            raise CheckpointError(f"{ckpt.directory / str(step)}: cannot restore this "
                                  f"checkpoint ({skipped[0][1]})")
        raise CheckpointError(
            f"{ckpt.directory}: no intact checkpoint (steps {', '.join(map(str, steps))} all "
            f"fail; newest, step {steps[0]}: {skipped[0][1]})")
    finally:
        ckpt.close()


def _restore_policy_state(ckpt: Checkpointer, step: int, cfg: RLConfig, agent) -> dict:
    """The policy's part of one step's saved state, into ``agent``'s structure."""
    saved = set(saved_state_keys(ckpt.directory / str(step) / "state"))
    target = {"params": agent.params}
    if "frozen" in saved:
        target["frozen"] = agent.frozen
    if "obs_rms" in saved and cfg.model.policy == "lidar_mlp" and cfg.ppo.norm_obs:
        dim = lidar_feature_dim(cfg.model.lidar_beams, cfg.model.velocity, cfg.model.history)
        target["obs_rms"] = RunningMeanStd.create((dim,))
    return ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract(target), partial_restore=True)))["state"]


def warm_start_policy(cfg: RLConfig) -> tuple[Any, Any, Any]:
    """(params, frozen, obs_rms) of the PPO checkpoint ``finetune.init_policy``, checked
    against this run's agent: the [model] sections must match, and so must the observation
    normalization. Raises ValueError naming the mismatch."""
    src = cfg.finetune.init_policy
    src_cfg, model, obs_rms = restore_policy(Path(src))
    mine, theirs = configlib.to_dict(cfg.model), configlib.to_dict(src_cfg.model)
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise ValueError(f"finetune.init_policy {src}: [model] differs from this config in "
                         + ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)"
                                     for k in diff))
    if (obs_rms is not None) != (cfg.model.policy == "lidar_mlp" and cfg.ppo.norm_obs):
        raise ValueError(f"finetune.init_policy {src}: ppo.norm_obs differs "
                         f"({src_cfg.ppo.norm_obs} there, {cfg.ppo.norm_obs} here)")
    _, _, trainable = make_agent(cfg)
    agent = split_agent(model, trainable)
    own = lambda t: jax.tree.map(lambda x: jax.numpy.array(x, copy=True), t)  # noqa: E731
    return own(agent.params), own(agent.frozen), own(obs_rms)
