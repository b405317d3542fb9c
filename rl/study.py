"""Does pretraining help? The whole study in one command: the pretraining data, pretraining,
the probes, every arm × seed of PPO, every evaluation, and the report.

    python -m rl.study --config configs/study_cpu.toml            # run, or resume
    python -m rl.study --config configs/study_cpu.toml --list     # the units, what is done
    python -m rl.study --config C --task 7     # arm × seed number 7: train it, evaluate it
    python -m rl.study --config C --workers 2  # the arm × seed tasks, two processes at once
    python -m rl.study --config C --stage report                  # the report from what exists
    python -m rl.study --config C --set seeds=[0,1] --set eval.episodes=2

Units (rl.study_config.units), in order: ``data/synth`` (etl.synth), ``data/etl``
(etl.build), ``tracks`` (only with an ``env.track_pool``: every track's maps into the cache,
one process per core, before any arm trains), ``pretrain`` (train.pretrain, the run
``runs/<name>/pretrain``), ``probe``
(train.probe on it), ``domain_gap`` (rl.domain_gap on it: the simulator's BEV next to the
pretraining data's, and the shift the encoder sees), then seed by seed, arm by arm,
``train/<arm>_s<seed>`` (rl.ppo, the run ``runs/<name>/ppo/<arm>_s<seed>``) and its
``eval/<arm>_s<seed>/<condition>`` (rl.evaluate: the training tracks, each sensor fault, the
unseen tracks). Each unit that finishes leaves a
completion marker, ``runs/<name>/markers/<unit>.json`` (status, exit code, wall time, the
hash of the unit's config and of its needs'); a unit whose marker says done for the same
config is skipped, so running the command again resumes — and the programs it runs resume
themselves (rl.ppo and train.pretrain from their checkpoints, etl.build drive by drive). A
unit whose config changed — or whose needs' did: a new pretraining makes every multimodal
arm stale — runs again afresh: its old run folder is renamed ``<folder>.stale-<hash>``. A
unit that fails is recorded (marker ``failed``, the error) and the study goes on without it
and without what needs it; the report names every missing result and why. Exit codes: 0 all
done, 1 some unit failed (the report is still written), 2 config error, 3 preempted
(requeue: it resumes).

Then the report (rl/study_report.py): ``runs/<name>/report.md``, ``report.json`` (every
number), ``figures/``: per arm the IQM with 95 % stratified-bootstrap intervals (rliable) of
laps in the time limit, clean episodes, lap time, the learning curve's area and the steps to
the first lap; P(arm > scratch); performance profiles; learning curves with bands; the same
under each sensor fault and on unseen tracks; the probe scores of the checkpoint; what data
the encoders saw, the budgets, the commit and the config hash.

On a cluster, ``slurm/study.sh`` runs the same units as jobs: data + pretraining + probe + domain
gap, then
an array of arm × seed tasks (``--task``), then the report (``--stage report``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from etl import configlib
from rl.config import RLConfig
from rl.study_config import (
    STAGES,
    Layout,
    StudyConfig,
    Unit,
    arm_config,
    check_base,
    load_study,
    prebuilt_tracks,
    units,
)
from rl.tracks import TrackError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_PREEMPTED = 0, 1, 2, 3
REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


class UnitError(RuntimeError):
    """A unit ran but did not leave what it should have (the message names what)."""


class UnitRunner(Protocol):
    """What runs one unit: returns its exit code (0 done, 3 preempted, else failed) or raises.
    :class:`LocalRunner` runs the real programs; tests inject a stub."""

    def __call__(self, study: Study, unit: Unit) -> int: ...


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Study:
    """A study's config, its units, their markers, and the loop that runs what is not done."""

    def __init__(self, cfg: StudyConfig, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.layout = Layout.of(cfg)
        self.base: RLConfig = check_base(cfg)
        from train.config import load_pretrain_config

        # the pretraining config loads (and is in range) before anything runs
        self.pretrain_cfg = load_pretrain_config(cfg.pretrain.config, self.pretrain_sets())
        self.units = units(cfg, self.base)
        self.by_name = {u.name: u for u in self.units}
        self.arm_cfgs = {(a, s): arm_config(cfg, a, s) for a in cfg.arms for s in cfg.seeds}
        self.policies = None  # rl.evaluate.PolicyCache, shared by the evaluations

    # ----------------------------------------------------------------------- what a unit is
    def pretrain_sets(self) -> list[str]:
        """train.pretrain's overrides: the config's, the study's run folder, the data."""
        c = self.cfg
        sets = [*c.pretrain.set, f"runs_dir={self.layout.root.as_posix()}", "run_name=pretrain"]
        if c.data.cache:
            sets.append(f"data.path={c.data.cache}")
        return sets

    def pretrain_args(self) -> list[str]:
        return ["--config", self.cfg.pretrain.config,
                *[a for s in self.pretrain_sets() for a in ("--set", s)]]

    def unit_config(self, unit: Unit) -> Any:
        """What a unit's result depends on (its marker's hash): another config, another
        result — the unit runs again."""
        c = self.cfg
        if unit.stage == "data":
            # etl_workers changes how fast, not what: counted as 1 whatever it is (the value
            # every marker written before this had, so their hashes hold)
            return {**configlib.to_dict(c.data), "etl_workers": 1}
        if unit.stage == "tracks":  # the maps' own cache keys hold the builder's version
            return {"tracks": list(prebuilt_tracks(c, self.base))}
        if unit.stage == "pretrain":
            return {"args": self.pretrain_args(), "config": _file_text(c.pretrain.config)}
        if unit.stage == "probe":
            return {"args": list(c.pretrain.probe_args),
                    "pretrain": self.unit_config(self.by_name["pretrain"])}
        if unit.stage == "gap":
            return {"args": self.domain_gap_args(),
                    "pretrain": self.unit_config(self.by_name["pretrain"])}
        # fields added to RLConfig since (configlib.added) count only where they are set
        rl = configlib.identity_dict(self.arm_cfgs[(unit.arm, unit.seed)])
        if unit.stage == "train":
            return rl
        e = c.eval
        return {"rl": rl, "condition": configlib.to_dict(unit.condition),
                "episodes": e.episodes, "time_limit": e.time_limit, "collision": e.collision}

    def domain_gap_args(self) -> list[str]:
        """rl.domain_gap's arguments but the checkpoint and the output: the base RL config's
        ``env.track`` (its pool, if any, left out) and world scale, then
        ``pretrain.domain_gap_args``."""
        e = self.base.env
        return ["--tracks", e.track, "--world-scale", f"{e.world_scale:g}",
                *self.cfg.pretrain.domain_gap_args]

    def unit_hash(self, unit: Unit) -> str:
        """The hash of the unit's config and of its needs' hashes (a new pretraining makes
        every multimodal arm's training, and its evaluations, stale)."""
        return _hash({"config": self.unit_config(unit),
                      "needs": [self.unit_hash(self.by_name[n]) for n in unit.needs]})

    def stale(self, unit: Unit) -> bool:
        """Whether the unit ran (or started) for another config than today's."""
        m = self.marker(unit)
        return m is not None and m.get("hash") != self.unit_hash(unit)

    def unit_folder(self, unit: Unit) -> Path | None:
        """The run folder a unit's program resumes from (pretraining, PPO), if any."""
        if unit.stage == "pretrain":
            return self.layout.pretrain
        if unit.stage == "train":
            return self.layout.run(unit.arm, unit.seed)
        return None

    def set_aside(self, unit: Unit, folder: Path) -> None:
        """Before a stale unit runs again: its old run folder is renamed (kept, never
        deleted), so its program starts afresh instead of resuming another config's run."""
        if folder.exists():
            old = (self.marker(unit) or {}).get("hash", "unknown")
            dst = folder.with_name(f"{folder.name}.stale-{old}")
            log(f"{unit.name}: its config changed; {folder} moved to {dst}")
            folder.rename(dst)

    # ----------------------------------------------------------------------- markers
    def marker_path(self, unit: Unit | str) -> Path:
        name = unit if isinstance(unit, str) else unit.name
        return self.layout.markers / f"{name}.json"

    def marker(self, unit: Unit | str) -> dict | None:
        p = self.marker_path(unit)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a marker cut off mid-write: the unit is not done

    def is_done(self, unit: Unit) -> bool:
        m = self.marker(unit)
        return m is not None and m.get("status") == "done" and m.get("hash") == self.unit_hash(
            unit)

    def write_marker(self, unit: Unit, status: str, code: int, wall_s: float,
                     error: str | None = None) -> None:
        p = self.marker_path(unit)
        p.parent.mkdir(parents=True, exist_ok=True)
        rec = {"unit": unit.name, "status": status, "code": code, "error": error,
               "wall_s": round(wall_s, 2), "hash": self.unit_hash(unit),
               "finished": datetime.now(UTC).isoformat(timespec="seconds"),
               "commit": git_commit()}  # fmt: skip
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2))
        tmp.replace(p)  # a marker is whole or absent

    # ----------------------------------------------------------------------- the loop
    def select(self, stages: set[str] | None = None, task: int | None = None) -> list[Unit]:
        """The units of ``stages`` (None: all), or of arm × seed number ``task``."""
        if task is not None:
            pairs = self.tasks()
            if not 0 <= task < len(pairs):
                raise configlib.ConfigError(f"--task {task}: the study has {len(pairs)} "
                                            f"arm × seed tasks (0..{len(pairs) - 1})")
            arm, seed = pairs[task]
            return [u for u in self.units if (u.arm, u.seed) == (arm, seed)
                    and (stages is None or u.stage in stages)]
        return [u for u in self.units if stages is None or u.stage in stages]

    def tasks(self) -> list[tuple[str, int]]:
        """The arm × seed pairs in run order (a Slurm array's task i is pair i)."""
        return [(u.arm, u.seed) for u in self.units if u.stage == "train"]

    def execute(self, todo: list[Unit], runner: UnitRunner) -> int:
        """Run every unit of ``todo`` that is not done and whose needs are; returns the exit
        code (3 at once on a preemption)."""
        failed = 0
        pending = [u for u in todo if not self.is_done(u)]
        log(f"{len(todo) - len(pending)} of {len(todo)} units done; {len(pending)} to run")
        for i, unit in enumerate(pending, 1):
            blocked = [n for n in unit.needs if not self.is_done(self.by_name[n])]
            if blocked:
                log(f"[{i}/{len(pending)}] {unit.name}: skipped, needs {', '.join(blocked)}")
                continue
            log(f"[{i}/{len(pending)}] {unit.name} …")
            t0 = time.perf_counter()
            try:
                folder = self.unit_folder(unit)
                if folder is not None and self.stale(unit):
                    self.set_aside(unit, folder)
                self.write_marker(unit, "running", -1, 0.0)  # what it ran for, if cut off
                code, error = runner(self, unit), None
            except Exception as e:  # the unit failed; the study goes on without it
                code, error = EXIT_FAILED, f"{type(e).__name__}: {' '.join(str(e).split())}"
                traceback.print_exc()
            wall = time.perf_counter() - t0
            if code == EXIT_PREEMPTED:
                log(f"{unit.name}: preempted after {wall:.0f} s (saved); exiting for requeue")
                return EXIT_PREEMPTED
            if code == EXIT_OK:
                self.write_marker(unit, "done", code, wall)
                log(f"[{i}/{len(pending)}] {unit.name}: done in {wall:.0f} s")
            else:
                failed += 1
                self.write_marker(unit, "failed", code, wall, error or f"exit code {code}")
                log(f"[{i}/{len(pending)}] {unit.name}: FAILED ({error or f'exit {code}'})")
        return EXIT_FAILED if failed else EXIT_OK

    # ----------------------------------------------------------------------- the report
    def meta(self, command: str) -> dict[str, Any]:
        """What the report states besides results: command, commit, config hash, machine,
        data, budgets, probe."""
        c, b = self.cfg, self.base
        d = c.data
        desc = (f"synthetic drives (etl.synth: {d.synth_drives} drives × {d.synth_frames} "
                f"sweeps, seed {d.synth_seed})" if d.kind == "synthetic" and d.synth_drives
                else "synthetic drives (etl.synth)" if d.kind == "synthetic"
                else "the real CMHT recordings")
        cache = d.cache or "the pretraining config's data.path"
        desc += f"; cache {cache}" + _manifest_summary(d.cache)
        pre = self._pretrain_summary()
        budget = b.ppo.total_timesteps
        rl = (f"{budget:,} env steps ({b.ppo.num_envs} envs × {b.ppo.num_steps} steps per "
              f"update), {b.env.backend} backend, track(s) {b.env.track}, "
              f"{b.model.policy} policy on {', '.join(b.model.modalities)}; base config "
              f"{c.rl.config}; fine-tuned arm's encoder lr × {c.rl.encoder_lr_scale:g}; "
              f"reference arm {', '.join(c.rl.reference)}")
        e = c.eval
        contacts = "end the episode" if e.collision == "terminate" else "allowed"
        ev = (f"grid start, deterministic policy, {e.episodes} episodes × {e.time_limit:g} s "
              f"per track, contacts {contacts} ({e.collision}); sensor faults on the first "
              f"{e.robust_tracks} "
              f"training track(s): lidar noise × {list(e.lidar_noise)}, rays dropped "
              f"{list(e.lidar_drop)}, IMU absent {e.imu_absent}; unseen {list(e.unseen)}")
        probe_path = self.layout.probe_json()
        probe = json.loads(probe_path.read_text()) if probe_path else None
        gap_path = self.layout.domain_gap_json()
        gap = json.loads(gap_path.read_text()) if gap_path else None
        return {
            "command": command, "commit": git_commit(), "config_path": self.config_path,
            "config_hash": configlib.config_hash(c), "config": configlib.to_dict(c),
            "machine": machine(), "built": datetime.now(UTC).isoformat(timespec="seconds"),
            "data": {"kind": d.kind, "description": desc}, "pretrain": pre, "rl": rl,
            "eval": ev, "probe": probe,
            "probe_path": str(probe_path) if probe_path else None,
            "probe_missing": None if probe_path else (
                "probe disabled (pretrain.probe = false)" if not c.pretrain.probe
                else f"no probe.json under {self.layout.pretrain}"),
            "domain_gap": gap, "domain_gap_path": str(gap_path) if gap_path else None,
            "domain_gap_missing": None if gap_path else (
                "disabled (pretrain.domain_gap = false)" if not c.pretrain.domain_gap
                else f"no domain_gap.json under {self.layout.domain_gap}"),
        }  # fmt: skip

    def _pretrain_summary(self) -> str:
        m, t = self.pretrain_cfg.model, self.pretrain_cfg.training
        return (f"{self.cfg.pretrain.config} (+ {list(self.cfg.pretrain.set)}): {t.steps:,} "
                f"steps × batch {t.batch_size}, mask ratio {t.mask_ratio:g}; encoder "
                f"embed_dim {m.embed_dim}, depth {m.depth}, fusion depth {m.fusion_depth}, "
                f"patch {m.patch_size}, modalities {', '.join(m.modalities)}; checkpoint "
                f"{self.layout.pretrain_ckpt}")

    def report(self, command: str) -> dict[str, Any]:
        from rl.study_report import build_report

        return build_report(self.cfg, self.base, self.meta(command), log=log)


def _file_text(path: str) -> str:
    p = Path(path)
    return p.read_text() if p.is_file() else f"<missing {path}>"


def _manifest_summary(cache: str) -> str:
    if not cache:
        return ""
    p = Path(cache) / "manifest.json"
    if not p.is_file():
        return " (no manifest.json yet)"
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError:
        return f" ({p}: not valid JSON)"
    parts = [f"{k} {m[k]}" for k in ("num_samples", "samples", "num_drives", "drives")
             if isinstance(m.get(k), int | float)]
    splits = m.get("splits")
    if isinstance(splits, dict):
        parts.append("splits " + ", ".join(
            f"{k}: {v.get('samples', v) if isinstance(v, dict) else v}" for k, v in
            splits.items() if not isinstance(v, list)))
    return f" ({'; '.join(parts)})" if parts else ""


def git_commit() -> str:
    """``<sha>`` of the working tree's HEAD, ``+dirty`` with uncommitted changes; "unknown"
    outside a git checkout (said as such in the report)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return sha + ("+dirty" if dirty.strip() else "")


def machine() -> str:
    import jax

    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return (f"{platform.node()}: {os.cpu_count()} CPUs, {len(devs)} {jax.default_backend()} "
            f"device(s) ({', '.join(kinds)}), Python {platform.python_version()}, "
            f"JAX {jax.__version__}")


# =========================================================================== the real units
def use_compilation_cache(root: Path) -> str:
    """Turn on JAX's persistent compilation cache for this process, in
    ``$JAX_COMPILATION_CACHE_DIR`` or else ``root/jax_cache``, and return the folder.

    A study's processes (its tasks, here or as a Slurm array) compile the same programs: the
    PPO loop of each arm for every seed, and the evaluation rollouts of one architecture for
    every arm, seed and condition, each 10-90 s on a CPU. A process finding a program in the
    cache loads it instead: the same executable, so the same numbers. Programs that compile in
    under ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (here 0.2 s unless set) are not
    kept. An entry that cannot be read (another process still writing it) is compiled anew,
    with JAX's warning."""
    import jax

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path(root) / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return folder


class LocalRunner:
    """Runs each unit's program in this process (their ``main``/``run`` functions), with
    JAX's persistent compilation cache on (:func:`use_compilation_cache`)."""

    def __init__(self):
        self.cache_dir: str | None = None

    def __call__(self, study: Study, unit: Unit) -> int:
        if self.cache_dir is None:
            self.cache_dir = use_compilation_cache(study.layout.root)
            log(f"JAX compilation cache: {self.cache_dir}")
        return getattr(self, f"_{unit.stage}")(study, unit)

    def _data(self, study: Study, unit: Unit) -> int:
        d = study.cfg.data
        if unit.name == "data/synth":
            from etl import synth

            return synth.main(["--out", d.raw, "--drives", str(d.synth_drives), "--frames",
                               str(d.synth_frames), "--format", "scene", "--seed",
                               str(d.synth_seed), "--workers", str(d.etl_workers)])
        from etl import build

        args = ["--src", d.raw, "--out", d.cache, "--workers", str(d.etl_workers),
                "--no-progress"]
        if d.etl_config:
            args += ["--config", d.etl_config]
        args += [a for s in d.etl_set for a in ("--set", s)]
        code = build.main(args)
        if code == 0 and not (Path(d.cache) / "manifest.json").is_file():
            raise UnitError(f"etl.build exited 0 but wrote no {d.cache}/manifest.json")
        return code

    def _tracks(self, study: Study, unit: Unit) -> int:
        from rl.tracks.__main__ import available_cores, build

        names, workers = list(prebuilt_tracks(study.cfg, study.base)), available_cores()
        log(f"tracks: the maps of {len(names)} tracks into the cache ({workers} processes)")
        failed = build(names, workers, log=log)
        if failed:
            raise UnitError(f"{len(failed)} of {len(names)} tracks failed to build (each "
                            f"named above), the first {failed[0]}")
        return 0

    def _pretrain(self, study: Study, unit: Unit) -> int:
        from train import pretrain
        from train.checkpoint import Checkpointer

        code = pretrain.main(study.pretrain_args())
        if code != 0:
            return code
        steps = study.pretrain_cfg.training.steps
        c = Checkpointer(study.layout.pretrain_ckpt)
        try:
            last = c.latest_step()
        finally:
            c.close()
        if last is None or last < steps:
            raise UnitError(f"train.pretrain exited 0 but {study.layout.pretrain_ckpt} has "
                            f"step {last}, not {steps}")
        return 0

    def _probe(self, study: Study, unit: Unit) -> int:
        from train import probe

        before = {p: p.stat().st_mtime for p in filter(None, [study.layout.probe_json()])}
        code = probe.main(["--ckpt", str(study.layout.pretrain),
                           *study.cfg.pretrain.probe_args])
        if code != 0:
            return code
        p = study.layout.probe_json()
        if p is None or (p in before and p.stat().st_mtime == before[p]):
            raise UnitError(f"train.probe exited 0 but wrote no probe.json under "
                            f"{study.layout.pretrain}")
        return 0

    def _gap(self, study: Study, unit: Unit) -> int:
        from rl import domain_gap

        out = study.layout.domain_gap
        (out / "domain_gap.json").unlink(missing_ok=True)  # its presence means a finished run
        code = domain_gap.main(["--ckpt", str(study.layout.pretrain), "--out", str(out),
                                *study.domain_gap_args()])
        if code == 0 and study.layout.domain_gap_json() is None:
            raise UnitError(f"rl.domain_gap exited 0 but wrote no {out}/domain_gap.json")
        return code

    def _train(self, study: Study, unit: Unit) -> int:
        from rl import ppo

        cfg = study.arm_cfgs[(unit.arm, unit.seed)]
        code = ppo.run(cfg)
        if code == 0 and not ppo.run_is_complete(cfg):
            raise UnitError(f"rl.ppo exited 0 but {cfg.runs_dir}/{cfg.run_name}/ckpt does not "
                            f"hold its last update ({cfg.ppo.num_updates})")
        return code

    def _evaluate(self, study: Study, unit: Unit) -> int:
        from rl import evaluate

        c, e = unit.condition, study.cfg.eval
        cfg = study.arm_cfgs[(unit.arm, unit.seed)]
        out = study.layout.eval(unit.arm, unit.seed, c.name)
        (out / "metrics.json").unlink(missing_ok=True)  # its presence means a finished run
        pert = evaluate.Perturbation(c.lidar_noise, c.lidar_drop, c.imu_absent)
        if study.policies is None:
            study.policies = evaluate.PolicyCache()
        evaluate.evaluate_checkpoint(
            Path(cfg.runs_dir) / cfg.run_name / "ckpt", c.tracks, out, backend="jax",
            episodes=e.episodes, time_limit=e.time_limit, collision=e.collision,
            perturbation=pert, plots=False, cache=study.policies,
            command=f"rl.study {study.cfg.name}: {unit.name}")  # fmt: skip
        return 0


# =========================================================================== workers
def study_command(config_path: str, sets: list[str], stages: set[str] | None = None,
                  task: int | None = None) -> list[str]:
    """The command line of a child ``rl.study`` process: the same study config and
    overrides, the stages asked for, and ``--task`` for one arm × seed task (what a Slurm
    array task runs); without a task and with stages that leave out the report, the shared
    units of those stages (run beside the tasks by ``--workers``)."""
    cmd = [sys.executable, "-m", "rl.study", "--config", config_path]
    cmd += [a for s in sets for a in ("--set", s)]
    if stages is not None:
        cmd += ["--stage", ",".join(sorted(stages))]
    return cmd if task is None else [*cmd, "--task", str(task)]


def run_workers(commands: dict[int | str, list[str]], workers: int, log_dir: Path,
                poll_s: float = 0.5, names: dict[int | str, str] | None = None) -> int:
    """Run ``commands`` (task → command line), at most ``workers`` at a time, each its own
    process with its output in ``log_dir/task_<i>.log`` (an arm × seed task ``i``) or
    ``log_dir/<key>.log`` (a str key, started before the tasks); a line per start and end. Returns 0
    when all exit 0, 3 as soon as one is preempted (no new task starts; the running ones
    are waited for), else 1. Tasks are separate units of work (their own runs, evaluations
    and markers), so side by side they cannot step on each other."""
    log_dir.mkdir(parents=True, exist_ok=True)
    def label(i):
        return (f"task {i}" if isinstance(i, int) else str(i)) + (
            f" ({names[i]})" if names and i in names else "")

    def log_file(i):
        return log_dir / (f"task_{i}.log" if isinstance(i, int) else f"{i}.log")

    queue = sorted(commands, key=lambda k: (isinstance(k, int), k))  # str keys first
    running: dict[int | str, tuple[subprocess.Popen, Any, float]] = {}
    failed = preempted = False
    while queue or running:
        while queue and len(running) < workers and not preempted:
            i = queue.pop(0)
            out = open(log_file(i), "ab")  # noqa: SIM115 (closed when it ends)
            running[i] = (subprocess.Popen(commands[i], stdout=out, stderr=subprocess.STDOUT,
                                           cwd=REPO), out, time.perf_counter())
            log(f"worker: {label(i)} started ({len(running)} running, {len(queue)} queued; "
                f"log {log_file(i)})")
        if preempted:
            queue.clear()  # the running ones are waited for
        time.sleep(poll_s)
        for i, (proc, out, t0) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            out.close()
            del running[i]
            log(f"worker: {label(i)} exited {code} after {time.perf_counter() - t0:.0f} s")
            preempted |= code == EXIT_PREEMPTED
            failed |= code not in (EXIT_OK, EXIT_PREEMPTED)
    return EXIT_PREEMPTED if preempted else EXIT_FAILED if failed else EXIT_OK


def execute_with_workers(study: Study, todo: list[Unit], runner: UnitRunner, workers: int,
                         config_path: str, sets: list[str], stages: set[str] | None) -> int:
    """``--workers N``: the shared units the arm × seed tasks need (data, pretraining) here;
    then, N processes side by side, the shared units no task needs (probe, domain gap) as one
    process started first, and the arm × seed tasks with something left to do."""
    shared = [u for u in todo if not u.arm]
    needed: set[str] = set()  # what the tasks need, transitively (a unit's needs come before it)
    for u in reversed(study.units):
        if u.arm or u.name in needed:
            needed |= set(u.needs)
    first = [u for u in shared if u.name in needed]
    code = study.execute(first, runner) if first else EXIT_OK
    if code == EXIT_PREEMPTED:
        return code
    beside = sorted({u.stage for u in shared if u.name not in needed and not study.is_done(u)})
    pending = {i for i in range(len(study.tasks()))
               for u in study.select(stages, i) if u in todo and not study.is_done(u)}
    log(f"{len(pending)} arm × seed tasks to run, {workers} at a time"
        + (f"; beside them: {', '.join(beside)}" if beside else ""))
    pairs = study.tasks()
    commands: dict[int | str, list[str]] = {
        i: study_command(config_path, sets, stages, i) for i in pending}
    names: dict[int | str, str] = {i: f"{pairs[i][0]}_s{pairs[i][1]}" for i in pending}
    if beside:
        commands["shared"] = study_command(config_path, sets, set(beside))
        names["shared"] = "+".join(beside)
    per_task = run_workers(commands, workers, study.layout.root / "logs", names=names)
    if per_task == EXIT_PREEMPTED:
        return per_task
    return EXIT_FAILED if EXIT_FAILED in (code, per_task) else EXIT_OK


# =========================================================================== CLI
def list_units(study: Study) -> str:
    lines = []
    for u in study.units:
        m = study.marker(u)
        state = ("done" if study.is_done(u) else "stale (config changed)"
                 if m and m.get("status") == "done" else m["status"] if m else "pending")
        wall = f"  {m['wall_s']:.0f} s" if m and m.get("wall_s") is not None else ""
        lines.append(f"{u.name:48s} {state}{wall}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, runner: UnitRunner | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rl.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the study TOML (configs/study_*.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one key of the study config, e.g. --set seeds=[0,1]")
    ap.add_argument("--stage", help=f"comma-separated stages to run: {', '.join(STAGES)}, "
                                    "report (default: all, then the report)")
    ap.add_argument("--task", type=int, help="only arm × seed number TASK (train, evaluate; "
                                             "no report): a Slurm array task")
    ap.add_argument("--workers", type=int, default=1,
                    help="run the arm × seed tasks in N processes side by side (each what "
                         "--task runs); the shared units and the report run here")
    ap.add_argument("--list", action="store_true", help="list the units and their state")
    ap.add_argument("--count", action="store_true", help="print the number of arm × seed tasks")
    args = ap.parse_args(argv)
    argv_ = sys.argv[1:] if argv is None else argv
    command = "python -m rl.study " + shlex.join(argv_)
    try:
        cfg = load_study(args.config, args.set)
        study = Study(cfg, args.config)
        stages = None
        if args.stage:
            stages = {s.strip() for s in args.stage.split(",") if s.strip()}
            unknown = sorted(stages - {*STAGES, "report"})
            if unknown:
                raise configlib.ConfigError(f"--stage: unknown {unknown} (known: "
                                            f"{', '.join((*STAGES, 'report'))})")
        todo = study.select(stages - {"report"} if stages else None, args.task)
        if args.workers < 1 or (args.workers > 1 and args.task is not None):
            raise configlib.ConfigError(f"--workers {args.workers}: a number ≥ 1, and "
                                        "without --task (a task is one process)")
    except (configlib.ConfigError, ValueError, TrackError) as e:
        return configlib.cli_error("rl.study", e)
    if args.count:
        print(len(study.tasks()))
        return EXIT_OK
    if args.list:
        print(list_units(study))
        return EXIT_OK
    log(f"{cfg.name}: {len(cfg.arms)} arms × {len(cfg.seeds)} seeds, "
        f"{len(study.units)} units, in {study.layout.root}")
    runner = runner or LocalRunner()
    if args.workers > 1:
        code = execute_with_workers(study, todo, runner, args.workers, args.config, args.set,
                                    stages - {"report"} if stages else None)
    else:
        code = study.execute(todo, runner) if todo else EXIT_OK
    if code == EXIT_PREEMPTED:
        return code
    if args.task is None and (stages is None or "report" in stages):
        try:
            study.report(command)
        except Exception:  # the units' results stay; the report can be rebuilt
            traceback.print_exc()
            log("the report failed (rebuild it with --stage report)")
            return EXIT_FAILED
    return code



if __name__ == "__main__":
    sys.exit(main())

