"""PPO in the racing simulators, from scratch or from the pretrained encoders.

    python -m rl.ppo --config configs/rl_racecar.toml [--set ppo.total_timesteps=2e6 ...]

Read top to bottom: build the runner for the config (rl/factory.py: the fast JAX runner for
``env.backend = "jax"``, the gymnasium runner for "bullet" and "racecar_gym"), restore the run
if it has a checkpoint (or warm-start the policy), then one loop: run a chunk of
``updates_per_log`` PPO updates, log, stop on a non-finite loss or parameters, checkpoint,
and on a preemption signal save and exit for requeue.

Writes ``runs/{run_name}/``: ``metrics.jsonl`` and TensorBoard events (episode return, laps,
collisions, SPS, losses), ``ckpt/`` (Orbax; what :meth:`rl.runners.Runner.checkpoint` keeps:
the fast runner's whole state, so a resumed run continues exactly; the gymnasium runner's
learner, its environments restarting their episodes), ``config.json``. Exit codes:
0 done, 2 config error or non-finite training (nothing saved), 3 preempted (saved; requeue).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from etl import configlib
from rl import factory
from rl.config import RLConfig, after_stages, cli_config, pool_draw, stage_config
from rl.fmt import num
from rl.runners import Runner, RunnerState
from rl.tracks import TrackError, track_names
from train.checkpoint import ArchitectureMismatch, Checkpointer, CheckpointError
from train.metrics import truncate_jsonl
from train.preempt import Preemption

EXIT_OK, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3


def log(msg: str) -> None:
    print(f"[ppo] {msg}", file=sys.stderr, flush=True)


class Logger:
    """metrics.jsonl (one record per logged chunk, keyed by env steps) and TensorBoard."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        rec = {"env_steps": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if np.isfinite(v):
                self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def summarize(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """Metrics stacked per update → one number each: episodes summed, the rest NaN-aware
    means (an update in which no episode ended has NaN episode statistics)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v, np.float64)
        if k == "episodes":
            out[k] = float(v.sum())
        else:
            out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def progress_line(update: int, total: int, steps: int, m: dict[str, float]) -> str:
    """The log line of one logged chunk. Episode statistics are NaN when no episode ended in
    the chunk (and the lap time when no lap was completed): they read "—", not "nan"."""
    return (f"update {update}/{total}  steps {steps}  "
            f"return {num(m.get('episode/ep_return'), '.1f')}  "
            f"laps {num(m.get('episode/laps'), '.2f')}  "
            f"collisions {num(m.get('episode/collisions'), '.2f')}  "
            f"lap time {num(m.get('episode/lap_time'), '.1f', ' s')}  "
            f"sps {num(m.get('sps'), '.0f')}")  # fmt: skip


def finite(state: RunnerState) -> bool:
    """Whether every trained parameter is finite (checked before any save)."""
    leaves = jax.tree.leaves(state.params)
    return bool(jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])))


def run(cfg: RLConfig, max_updates: int | None = None) -> int:
    """Train (or resume) the configured run, its curriculum stages first (``[[stages]]``:
    each a run of its own in runs/<run>/stages/<i>-<name>, resumed like one, skipped once
    complete); returns the process exit code. ``max_updates`` bounds each of them."""
    for i in range(len(cfg.stages)):
        scfg = stage_config(cfg, i)
        if run_is_complete(scfg):
            continue
        log(f"stage {i + 1}/{len(cfg.stages)} {cfg.stages[i].name!r}: "
            f"{scfg.ppo.total_timesteps:,} steps")
        code = _run_one(scfg, max_updates)
        if code != EXIT_OK or not run_is_complete(scfg):
            return code
    return _run_one(after_stages(cfg), max_updates)


def _latest_step(ckpt: Path) -> int | None:
    """The newest saved step under ``ckpt``, None when there is none (or no folder)."""
    if not ckpt.exists():
        return None
    c = Checkpointer(ckpt)
    try:
        return c.latest_step()
    finally:
        c.close()


def run_is_complete(cfg: RLConfig) -> bool:
    """Whether a run (or a stage's) has saved its last update."""
    step = _latest_step(Path(cfg.runs_dir) / cfg.run_name / "ckpt")
    return step is not None and step >= cfg.ppo.num_updates


def _run_one(cfg: RLConfig, max_updates: int | None = None) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(configlib.to_dict(cfg), indent=2))
    # a resumed or warm-started policy brings its own feature statistics: no first-rollout fit
    restores = _latest_step(run_dir / "ckpt") is not None or bool(cfg.finetune.init_policy)
    runner = factory.make_runner(cfg, fit_norm=not restores)
    try:
        return train(cfg, runner, run_dir, max_updates)
    finally:
        runner.close()


def train(cfg: RLConfig, runner: Runner, run_dir: Path, max_updates: int | None = None) -> int:
    """The training loop, the same for every runner."""
    state = runner.init(jax.random.PRNGKey(cfg.seed))
    ckpt = Checkpointer(run_dir / "ckpt", keep=cfg.keep)
    record = {"rl": configlib.to_dict(cfg), "kind": "ppo"}
    start = ckpt.latest_step()
    if start is not None:
        try:  # same [model] as saved, then the newest intact step (a damaged one is skipped)
            factory.check_resume_architecture(cfg, ckpt)
            saved, _, _ = ckpt.restore(runner.checkpoint(state))
        except BaseException:
            ckpt.close()
            raise
        state = runner.restore(state, saved)
        # the records logged after this checkpoint are logged again from here: drop them
        truncate_jsonl(run_dir / "metrics.jsonl",
                       int(state.update) * cfg.ppo.num_envs * cfg.ppo.num_steps, "env_steps")
        log(f"resumed {run_dir} at update {int(state.update)}")
    else:  # from update 0: what a run killed before its first checkpoint logged goes
        truncate_jsonl(run_dir / "metrics.jsonl", 0, "env_steps")
    if start is None and cfg.finetune.init_policy:
        params, frozen, obs_rms = factory.warm_start_policy(cfg)
        state = runner.place(state._replace(params=params, frozen=frozen, obs_rms=obs_rms))
        log(f"policy initialised from {cfg.finetune.init_policy}")
    update = int(state.update)
    total = runner.num_updates if max_updates is None else min(runner.num_updates, max_updates)
    steps_per_update = cfg.ppo.num_envs * cfg.ppo.num_steps
    logger, preempt, code = Logger(run_dir), Preemption(), EXIT_OK
    log(f"{cfg.run_name}: {cfg.model.policy} on {cfg.env.track} ({cfg.env.backend} backend), "
        f"{cfg.ppo.num_envs} envs × {cfg.ppo.num_steps} steps, {total} updates, "
        f"{jax.device_count()} device(s)")  # fmt: skip
    try:
        while update < total:
            t0 = time.perf_counter()
            state, metrics = runner.run(state, min(cfg.updates_per_log, total - update),
                                        stop=lambda: preempt.signal is not None)
            jax.block_until_ready(state.params)
            prev, update = update, int(state.update)
            m = summarize(metrics)
            m["sps"] = (update - prev) * steps_per_update / (time.perf_counter() - t0)
            m["physics_sps"] = m["sps"] * cfg.env.action_repeat
            logger.write(update * steps_per_update, m)
            log(progress_line(update, total, update * steps_per_update, m))
            if not (np.isfinite(m["loss/total"]) and finite(state)):
                log(f"non-finite loss or parameters at update {update}: stopping; "
                    "this update is not saved")
                code = EXIT_NONFINITE
                break
            if cfg.env.track_pool and update < total and (
                    update // cfg.env.pool_every > prev // cfg.env.pool_every):
                draw = update // cfg.env.pool_every  # before the save: a resume has its maps
                state = runner.swap_env_params(state, factory.pool_params(cfg, draw))
                names = pool_draw(cfg, draw)[len(track_names(cfg.env.track)):]
                log(f"track pool draw {draw}: {len(names)} tracks ({', '.join(names[:4])}"
                    f"{', …' if len(names) > 4 else ''})")
            due = update // cfg.ckpt_every > prev // cfg.ckpt_every
            if due or update >= total or preempt.signal:
                ckpt.save(update, runner.checkpoint(state), {"update": update}, record)
            if preempt.signal:
                log(f"signal {preempt.signal}: saved update {update}, exiting for requeue")
                code = EXIT_PREEMPTED
                break
    finally:
        preempt.restore()
        ckpt.close()
        logger.close()
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="TOML config (defaults when omitted)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one key, e.g. --set ppo.num_envs=256")  # fmt: skip
    ap.add_argument("--max-updates", type=int, help="stop after this many updates (in total)")
    args = ap.parse_args(argv)
    cfg = cli_config("rl.ppo", args.config, args.set)
    if cfg is None:
        return 2
    try:
        return run(cfg, args.max_updates)
    except ArchitectureMismatch as e:  # resuming with another [model]: a config error
        print(f"rl.ppo: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # no intact checkpoint to resume from
        print(f"rl.ppo: error: {e}", file=sys.stderr)
        return 1
    except TrackError as e:  # a missing or broken track (env.track): bad input, one line
        print(f"rl.ppo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
