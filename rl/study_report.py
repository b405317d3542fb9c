"""The study's report: every run's numbers read from disk, aggregated over seeds with rliable,
written as ``report.md`` + ``report.json`` (every number) + ``figures/``.

What is aggregated, per arm, over its seeds (Agarwal et al., NeurIPS 2021, and their rliable):

* the **interquartile mean** (IQM: the mean of the middle 50 % of the run × track scores,
  ``rliable.metrics.aggregate_iqm``) with a **95 % stratified-bootstrap interval** (runs
  resampled with replacement within each track, percentile method,
  ``rliable.library.get_interval_estimates``);
* the **probability of improvement** of each arm over scratch, P(X > Y) (the Mann-Whitney
  statistic over run pairs, averaged over tracks) with its bootstrap interval;
* **performance profiles** (the fraction of run × track scores above τ, with bands) and
  **learning curves** (the IQM over seeds at each step, with its 95 % band).

Scores. From each run's evaluation (rl.evaluate's metrics.json, one per condition): per track,
``laps`` = mean laps in the time limit over the episodes, ``clean`` = the fraction of episodes
without a wall contact, ``lap_time`` = the mean completed-lap time (tracks where the run
completed no lap are left out). From its training log (metrics.jsonl): ``auc`` = the area under
the learning curve of laps per episode over the step budget, divided by the budget (the mean
laps per episode over training; logged points joined linearly, held flat before the first and
after the last), and ``first_lap`` = the env steps of the first logged chunk in which an episode
completed a lap (clean when contacts end training episodes; a run that never did is left out
of the IQM and counted as "not reached").

A run or an evaluation that is missing — failed, blocked by a failed unit, or not run — is
named in the report with the reason; the aggregates say on how many runs they rest.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rl.config import RLConfig
from rl.fmt import DASH, finite, num
from rl.plots import CURVES, pyplot, read_curve, save_figure
from rl.study_config import (
    BASELINE,
    REFERENCE,
    Condition,
    Layout,
    StudyConfig,
    Unit,
    conditions,
    run_name,
    units,
)

LAPS_KEYS = dict(CURVES)["laps per episode"]
RETURN_KEYS = dict(CURVES)["episode return"]
ARM_LABELS = {
    "scratch": "scratch (random init, end to end)",
    "pretrained_frozen": "pretrained, frozen",
    "pretrained_finetuned": "pretrained, fine-tuned",
    "random_frozen": "random, frozen",
    "lidar_mlp": "lidar MLP (reference)",
}


# =========================================================================== statistics
@contextlib.contextmanager
def _seeded(seed: int):
    """rliable's bootstrap draws from numpy's global generator: seed it for one call (the
    same intervals every time the report is built), then put the caller's state back."""
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002 - rliable.library.StratifiedBootstrap uses np.random
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def iqm_interval(scores: np.ndarray, reps: int, seed: int = 0) -> dict[str, Any]:
    """IQM of a (runs × tasks) score matrix and its 95 % stratified-bootstrap interval:
    ``{"iqm", "lo", "hi", "runs", "tasks"}`` (None values when there is no run)."""
    from rliable import library, metrics

    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        return {"iqm": None, "lo": None, "hi": None, "runs": 0,
                "tasks": int(scores.shape[1]) if scores.ndim == 2 else 0}
    if not np.isfinite(scores).all():
        raise ValueError("iqm_interval: scores must be finite (leave undefined ones out)")
    with _seeded(seed):
        point, ci = library.get_interval_estimates(
            {"x": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps)
    return {"iqm": float(point["x"][0]), "lo": float(ci["x"][0, 0]),
            "hi": float(ci["x"][1, 0]), "runs": int(scores.shape[0]),
            "tasks": int(scores.shape[1])}


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + ½ P(X = Y) over every pair of runs, averaged over tasks: what
    ``rliable.metrics.probability_of_improvement`` computes (its Mann-Whitney U / (n·m)),
    vectorised — scipy's test per task and bootstrap resample is ~10× slower."""
    gt = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))
    eq = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return float(np.mean(gt + 0.5 * eq))


def improvement_interval(x: np.ndarray, y: np.ndarray, reps: int,
                         seed: int = 0) -> dict[str, Any]:
    """P(X > Y) of two (runs × tasks) score matrices (ties count one half; averaged over
    tasks) and its 95 % stratified-bootstrap interval (each side resampled on its own):
    ``{"p", "lo", "hi", "runs_x", "runs_y"}``."""
    from rliable import library

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or not len(x) or not len(y):
        return {"p": None, "lo": None, "hi": None, "runs_x": len(x), "runs_y": len(y)}
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"improvement_interval: {x.shape[1]} tasks against {y.shape[1]}")
    with _seeded(seed):
        point, ci = library.get_interval_estimates(
            {"x": (x, y)}, lambda a, b: np.array([probability_of_improvement(a, b)]),
            reps=reps)
    return {"p": float(point["x"][0]), "lo": float(ci["x"][0, 0]), "hi": float(ci["x"][1, 0]),
            "runs_x": len(x), "runs_y": len(y)}


def curve_band(curves: np.ndarray, reps: int, seed: int = 0) -> dict[str, Any]:
    """Per point of (runs × points) learning curves: the IQM over runs and its 95 %
    bootstrap band (runs resampled)."""
    from rliable import library
    from scipy.stats import trim_mean

    curves = np.asarray(curves, np.float64)
    if curves.ndim != 2 or not len(curves):
        return {"iqm": [], "lo": [], "hi": [], "runs": 0}
    with _seeded(seed):
        point, ci = library.get_interval_estimates(
            {"x": curves[:, None, :]},
            lambda s: trim_mean(s.reshape(s.shape[0], -1), 0.25, axis=0), reps=reps)
    return {"iqm": point["x"].tolist(), "lo": ci["x"][0].tolist(), "hi": ci["x"][1].tolist(),
            "runs": len(curves)}


# =========================================================================== reading runs
def learning_auc(steps: np.ndarray, values: np.ndarray, budget: int) -> float | None:
    """(1 / budget) ∫₀^budget v(s) ds, v joined linearly between the logged points and held
    flat before the first and after the last; None without a point."""
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    ok = np.isfinite(values)
    steps, values = steps[ok], values[ok]
    if not len(steps):
        return None
    grid = np.linspace(0.0, float(budget), 2001)
    v = np.interp(grid, steps, values)
    return float(np.trapezoid(v, grid) / budget)


def first_lap_steps(metrics_jsonl: Path) -> float | None:
    """Env steps of the first logged chunk with a finite ``episode/lap_time`` (an episode that
    ended in it had completed a lap); None if no chunk has one."""
    steps, _ = read_curve(metrics_jsonl, "episode/lap_time")
    return float(steps[0]) if len(steps) else None


def curve_on_grid(metrics_jsonl: Path, keys, grid: np.ndarray) -> np.ndarray | None:
    steps, values = read_curve(metrics_jsonl, keys)
    if not len(steps):
        return None
    return np.interp(grid, steps, values)


def _read_json(path: Path) -> dict | None:
    """A JSON file, or None when it is missing; a broken one raises naming the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def track_scores(report: dict, condition: Condition,
                 path: Path | str = "") -> dict[str, dict[str, float | None]]:
    """Per track of an evaluation report (rl.evaluate's metrics.json at ``path``, one
    protocol): ``{"laps", "clean", "lap_time"}`` (lap time None where no lap was completed).
    Raises ValueError naming the file and what is wrong with it."""
    try:
        (mode,) = report["results"]  # the study evaluates one collision protocol
        tracks = report["results"][mode]["tracks"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: not an rl.evaluate report of one protocol") from None
    out = {}
    for t in condition.tracks:
        if t not in tracks:
            raise ValueError(f"{path}: no result for track {t!r} ({condition.name})")
        a = tracks[t]["aggregate"]
        out[t] = {"laps": finite(a.get("laps_mean")),
                  "clean": finite(a.get("collision_free_fraction")),
                  "lap_time": finite(a.get("lap_time_mean"))}
        if out[t]["laps"] is None or out[t]["clean"] is None:
            raise ValueError(f"{path}: track {t!r} has no laps or clean-episode value")
    return out


def marker(layout: Layout, unit: str) -> dict | None:
    return _read_json(layout.markers / f"{unit}.json")


def why_missing(layout: Layout, by_name: dict[str, Unit], name: str) -> str:
    """Why a unit has no result: its own failure, else the first of its needs that is not
    done (recursively), else "not run"."""
    m = marker(layout, name)
    if m is not None and m.get("status") == "failed":
        return f"{name} failed: {m.get('error') or 'exit code ' + str(m.get('code'))}"
    if m is not None and m.get("status") == "running":
        return f"{name} started and has not finished (still running, or interrupted)"
    for need in by_name[name].needs if name in by_name else ():
        nm = marker(layout, need)
        if nm is None or nm.get("status") != "done":
            return why_missing(layout, by_name, need)
    return f"{name} not run"


def missing_lines(missing: list[dict[str, str]]) -> list[str]:
    """The report's list of missing units, one line per reason: a run and those of its
    evaluations missing for the same reason read "`train/<run>` and its N evaluations"."""
    by_reason: dict[str, list[str]] = {}
    for m in missing:
        by_reason.setdefault(m["reason"], []).append(m["unit"])
    lines = []
    for reason, names in by_reason.items():
        trains = [u for u in names if u.startswith("train/")]
        evals = [u for u in names if u.startswith("eval/")]
        if len(trains) == 1 and len(trains) + len(evals) == len(names) and all(
                u.split("/")[1] == trains[0].split("/")[1] for u in evals):
            tail = f" and its {len(evals)} evaluation{'s' * (len(evals) != 1)}" if evals else ""
            lines.append(f"- `{trains[0]}`{tail}: {reason}")
        else:
            lines.append("- " + ", ".join(f"`{u}`" for u in names) + f": {reason}")
    return lines


# =========================================================================== the report
def collect(cfg: StudyConfig, base: RLConfig) -> dict[str, Any]:
    """Every run's numbers from disk, and what is missing (each with its reason)."""
    lay = Layout.of(cfg)
    conds = conditions(cfg, base)
    by_name = {u.name: u for u in units(cfg, base)}
    budget = base.ppo.total_timesteps
    runs: dict[str, dict[int, dict]] = {}
    missing: list[dict[str, str]] = []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            name = run_name(arm, seed)
            rec: dict[str, Any] = {"conditions": {}}
            mj = lay.run(arm, seed) / "metrics.jsonl"
            if mj.is_file() and (lay.markers / f"train/{name}.json").is_file() and \
                    (marker(lay, f"train/{name}") or {}).get("status") == "done":
                steps, laps = read_curve(mj, LAPS_KEYS)
                rec["auc"] = learning_auc(steps, laps, budget)
                rec["first_lap"] = first_lap_steps(mj)
                _, ret = read_curve(mj, RETURN_KEYS)
                rec["final_return"] = float(np.mean(ret[-5:])) if len(ret) else None
                rec["wall_s"] = (marker(lay, f"train/{name}") or {}).get("wall_s")
                rec["metrics"] = str(mj)
            else:
                missing.append({"unit": f"train/{name}",
                                "reason": why_missing(lay, by_name, f"train/{name}")})
            for c in conds:
                unit = f"eval/{name}/{c.name}"
                path = lay.eval(arm, seed, c.name) / "metrics.json"
                rep = _read_json(path)
                if rep is None:
                    missing.append({"unit": unit, "reason": why_missing(lay, by_name, unit)})
                    continue
                rec["conditions"][c.name] = track_scores(rep, c, path)
            runs.setdefault(arm, {})[seed] = rec
    return {"runs": runs, "missing": missing, "conditions": conds, "budget": budget}


def timing(cfg: StudyConfig, base: RLConfig) -> dict[str, Any]:
    """Where the study's time went, from its units' markers: the wall seconds of the units
    that finished, summed per stage (the training per arm), their total, and the span from
    the first of them starting to the last finishing. A span above the total means several
    sittings (resumes) or gaps between units; below it, units ran side by side (Slurm array
    tasks, several ``--task`` workers). Units without a finished marker count as untimed."""
    lay = Layout.of(cfg)
    by_stage: dict[str, float] = {}
    train_by_arm: dict[str, float] = {}
    starts, ends, untimed = [], [], 0
    for u in units(cfg, base):
        m = marker(lay, u.name) or {}
        wall, fin = finite(m.get("wall_s")), m.get("finished")
        if m.get("status") != "done" or wall is None or not fin:
            untimed += 1
            continue
        by_stage[u.stage] = by_stage.get(u.stage, 0.0) + wall
        if u.stage == "train":
            train_by_arm[u.arm] = train_by_arm.get(u.arm, 0.0) + wall
        end = datetime.fromisoformat(fin).timestamp()
        starts.append(end - wall)
        ends.append(end)
    span = max(ends) - min(starts) if ends else None
    return {"by_stage_s": by_stage, "train_by_arm_s": train_by_arm,
            "total_s": sum(by_stage.values()), "span_s": span,
            "first_start": (datetime.fromtimestamp(min(starts), UTC).isoformat(timespec="seconds")
                            if starts else None),
            "last_finish": (datetime.fromtimestamp(max(ends), UTC).isoformat(timespec="seconds")
                            if ends else None),
            "untimed_units": untimed}


def timing_section(t: dict[str, Any]) -> list[str]:
    mins = lambda s: DASH if s is None else f"{s / 60:.1f}"  # noqa: E731
    L = ["## Where the time went", "",
         "The finished units' own wall times (their markers), in minutes:", "",
         "| stage | minutes |", "|---|---|"]
    for stage, s in t["by_stage_s"].items():
        L.append(f"| {stage} | {mins(s)} |")
        if stage == "train":
            L += [f"| &nbsp;&nbsp;train, {ARM_LABELS[a]} | {mins(v)} |"
                  for a, v in t["train_by_arm_s"].items()]
    L += [f"| **all units** | **{mins(t['total_s'])}** |", "",
          f"- From the first unit's start ({t['first_start'] or DASH}) to the last one's end "
          f"({t['last_finish'] or DASH}): {mins(t['span_s'])} min. Above the units' sum: "
          "several sittings (resumes) or gaps between units; below it: units ran side by "
          "side (array tasks, several workers), each slowed by the others.",
          f"- Units without a finished marker (not timed): {t['untimed_units']}.", ""]
    return L


def _matrix(runs: dict[int, dict], cond: Condition, key: str) -> tuple[np.ndarray, list[int]]:
    """(runs × tracks) scores of one condition and the seeds they come from (runs without
    this evaluation are left out)."""
    rows, seeds = [], []
    for seed, rec in sorted(runs.items()):
        per = rec["conditions"].get(cond.name)
        if per is None:
            continue
        rows.append([per[t][key] for t in cond.tracks])
        seeds.append(seed)
    return np.asarray(rows, np.float64).reshape(len(rows), len(cond.tracks)), seeds


def _run_values(runs: dict[int, dict], key: str) -> np.ndarray:
    """One number per run (``auc``, ``first_lap``) as a (runs × 1) matrix, undefined left out."""
    v = [finite(r.get(key)) for r in runs.values()]
    return np.asarray([[x] for x in v if x is not None], np.float64).reshape(-1, 1)


def _lap_times(runs: dict[int, dict], cond: Condition) -> np.ndarray:
    """Per run: the mean lap time over the tracks where it completed a lap (runs that
    completed none left out), as a (runs × 1) matrix."""
    out = []
    for rec in runs.values():
        per = rec["conditions"].get(cond.name)
        if per is None:
            continue
        lt = [per[t]["lap_time"] for t in cond.tracks if per[t]["lap_time"] is not None]
        if lt:
            out.append([float(np.mean(lt))])
    return np.asarray(out, np.float64).reshape(-1, 1)


def aggregate(cfg: StudyConfig, data: dict[str, Any]) -> dict[str, Any]:
    """Every aggregate of the report (see the module docstring), JSON-ready."""
    reps, seed = cfg.report.reps, cfg.report.seed
    runs, conds = data["runs"], data["conditions"]
    train = conds[0]
    arms: dict[str, Any] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for arm in cfg.arms:
        r = runs[arm]
        laps, laps_seeds = _matrix(r, train, "laps")
        clean, _ = _matrix(r, train, "clean")
        first = _run_values(r, "first_lap")
        trained = sum("auc" in rec for rec in r.values())
        scores[arm] = {"laps": laps, "clean": clean, "auc": _run_values(r, "auc")}
        arms[arm] = {
            "seeds_evaluated": laps_seeds,
            "laps": iqm_interval(laps, reps, seed),
            "clean": iqm_interval(clean, reps, seed),
            "lap_time": iqm_interval(_lap_times(r, train), reps, seed),
            "auc": iqm_interval(scores[arm]["auc"], reps, seed),
            "first_lap": {**iqm_interval(first, reps, seed), "reached": len(first),
                          "trained": trained},
            "conditions": {
                c.name: {"laps": iqm_interval(_matrix(r, c, "laps")[0], reps, seed),
                         "clean": iqm_interval(_matrix(r, c, "clean")[0], reps, seed)}
                for c in conds[1:]},
        }  # fmt: skip
    improvement = {}
    for arm in cfg.arms:
        if arm == BASELINE:
            continue
        improvement[arm] = {k: improvement_interval(scores[arm][k], scores[BASELINE][k], reps,
                                                    seed)
                            for k in ("laps", "clean", "auc")}
    return {"arms": arms, "improvement_over_scratch": improvement}


def profiles(cfg: StudyConfig, data: dict[str, Any], out: Path) -> Path | None:
    """Performance profiles of the training-track laps (rliable): the fraction of run × track
    scores above τ, with 95 % bands. None when no arm has a score."""
    from rliable import library, plot_utils

    train = data["conditions"][0]
    score = {ARM_LABELS[a]: _matrix(data["runs"][a], train, "laps")[0] for a in cfg.arms}
    score = {k: v for k, v in score.items() if len(v)}
    if not score:
        return None
    top = max(float(v.max()) for v in score.values())
    taus = np.linspace(min(0.0, min(float(v.min()) for v in score.values())),
                       max(top, 1.0) * 1.05, 101)
    with _seeded(cfg.report.seed):
        prof, cis = library.create_performance_profile(score, taus,
                                                       reps=cfg.report.curve_reps)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(prof, taus, performance_profile_cis=cis, ax=ax,
                                         xlabel=r"laps in the time limit ($\tau$)",
                                         ylabel=r"fraction of run × track scores $> \tau$")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"{cfg.name}: performance profiles, training track(s)")
    return save_figure(fig, out)


def learning_curves(cfg: StudyConfig, data: dict[str, Any], out: Path) -> tuple[dict, Path | None]:
    """Learning curves per arm: the IQM over seeds at ``curve_points`` steps and its 95 %
    band, laps per episode and return; (the curves' numbers, the PNG or None)."""
    grid = np.linspace(0.0, float(data["budget"]), cfg.report.curve_points)
    numbers: dict[str, Any] = {"env_steps": grid.tolist()}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    drawn = False
    for ax, (label, keys) in zip(axes, (("laps per episode", LAPS_KEYS),
                                        ("episode return", RETURN_KEYS)), strict=True):
        per_arm = {}
        for arm in cfg.arms:
            ys = [curve_on_grid(Path(rec["metrics"]), keys, grid)
                  for rec in data["runs"][arm].values() if "metrics" in rec]
            ys = [y for y in ys if y is not None]
            if not ys:
                continue
            band = curve_band(np.stack(ys), cfg.report.curve_reps, cfg.report.seed)
            per_arm[arm] = band
            line, = ax.plot(grid, band["iqm"], label=f"{ARM_LABELS[arm]} (n={band['runs']})")
            ax.fill_between(grid, band["lo"], band["hi"], color=line.get_color(), alpha=0.2)
            drawn = True
        numbers[label] = per_arm
        ax.set_title(f"{label}: IQM over seeds, 95 % bootstrap band", fontsize=10)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        return numbers, None
    fig.suptitle(cfg.name)
    return numbers, save_figure(fig, out)


def interval_figure(cfg: StudyConfig, agg: dict[str, Any], out: Path) -> Path | None:
    """IQM and 95 % interval per arm: laps, clean episodes, AUC; and P(arm > scratch)."""
    plt = pyplot()
    panels = [("laps", "laps in the time limit"), ("clean", "clean-episode rate"),
              ("auc", "learning-curve AUC (laps)")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 0.6 * len(cfg.arms) + 1.8), sharey=True)
    arms = list(cfg.arms)
    y = np.arange(len(arms))[::-1]
    drawn = False
    for ax, (key, title) in zip(axes[:3], panels, strict=True):
        for yi, arm in zip(y, arms, strict=True):
            s = agg["arms"][arm][key]
            if s["iqm"] is None:
                continue
            ax.errorbar(s["iqm"], yi, xerr=[[s["iqm"] - s["lo"]], [s["hi"] - s["iqm"]]],
                        fmt="o", capsize=4)
            drawn = True
        ax.set_title(f"{title}\nIQM, 95 % CI", fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[3]
    for yi, arm in zip(y, arms, strict=True):
        s = agg["improvement_over_scratch"].get(arm, {}).get("laps")
        if s is None or s["p"] is None:
            continue
        ax.errorbar(s["p"], yi, xerr=[[s["p"] - s["lo"]], [s["hi"] - s["p"]]], fmt="s",
                    capsize=4, color="C3")
    ax.axvline(0.5, color="gray", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_title("P(arm > scratch), laps\n95 % CI", fontsize=10)
    ax.grid(alpha=0.3)
    axes[0].set_yticks(y, [ARM_LABELS[a] for a in arms])
    if not drawn:
        plt.close(fig)
        return None
    return save_figure(fig, out)


def robustness_figure(cfg: StudyConfig, data: dict, agg: dict, out: Path) -> Path | None:
    """Laps (IQM, 95 % CI) per condition and arm: nominal, each fault, unseen tracks."""
    conds = data["conditions"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(conds)), 4.2))
    width = 0.8 / max(len(cfg.arms), 1)
    drawn = False
    for i, arm in enumerate(cfg.arms):
        xs, ys, lo, hi = [], [], [], []
        for j, c in enumerate(conds):
            s = agg["arms"][arm]["laps"] if j == 0 else agg["arms"][arm]["conditions"][
                c.name]["laps"]
            if s["iqm"] is None:
                continue
            xs.append(j + (i - (len(cfg.arms) - 1) / 2) * width)
            ys.append(s["iqm"])
            lo.append(s["iqm"] - s["lo"])
            hi.append(s["hi"] - s["iqm"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=ARM_LABELS[arm])
            drawn = True
    ax.set_xticks(range(len(conds)), [c.name for c in conds], rotation=20, fontsize=8)
    ax.set_ylabel("laps in the time limit (IQM, 95 % CI)")
    ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    ax.legend(fontsize=8)
    ax.set_title(f"{cfg.name}: robustness without retraining")
    return save_figure(fig, out)


# =========================================================================== markdown
def _ci(s: dict, spec: str = ".2f", unit: str = "") -> str:
    if s is None or s.get("iqm") is None:
        return DASH
    return f"{num(s['iqm'], spec)}{unit} [{num(s['lo'], spec)}, {num(s['hi'], spec)}]"


def _p(s: dict | None) -> str:
    if s is None or s.get("p") is None:
        return DASH
    return f"{s['p']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"


def _flat_numbers(d: Any, prefix: str = "") -> list[tuple[str, float]]:
    """The numeric leaves of a JSON tree (lists of more than 4 numbers left out)."""
    out: list[tuple[str, float]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _flat_numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list) and 0 < len(d) <= 4 and all(isinstance(x, int | float) for x in d):
        out.append((prefix, d))
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out.append((prefix, d))
    return out


def _ci3(d: dict | None, spec: str = "{:+.3f}") -> str:
    """A train.probe / rl.domain_gap interval record {estimate, low, high} as "x [lo, hi]"."""
    if not isinstance(d, dict) or d.get("estimate") is None:
        return DASH
    return (f"{spec.format(d['estimate'])} [{spec.format(d['low'])}, "
            f"{spec.format(d['high'])}]")


def _verdict(d: dict | None, higher_is_better: bool = True) -> str:
    if not isinstance(d, dict) or d.get("low") is None:
        return DASH
    if d["low"] > 0:
        return "pretrained better" if higher_is_better else "pretrained worse"
    if d["high"] < 0:
        return "pretrained worse" if higher_is_better else "pretrained better"
    return "no difference shown (the interval holds 0)"


def probe_section(meta: dict, figs: dict[str, str] | None = None) -> list[str]:
    """The probe scores of the checkpoint used: train.probe's differences (pretrained − random
    init, paired 95 % intervals) and each feature set's scores; any other probe record as its
    numbers; then the checkpoint's reconstructions of held-out drives and the probes'
    predictions, where train.probe drew them."""
    probe = meta.get("probe")
    L = ["## Probe scores of the pretraining checkpoint used", ""]
    if probe is None:
        return L + [f"No probe report ({meta.get('probe_missing', 'train.probe did not run')}).",
                    ""]
    L.append(f"From `{meta.get('probe_path')}` (train.probe, step "
             f"{probe.get('checkpoint_step', DASH)}; {probe.get('data_note', DASH)}):")
    L.append("")
    occ, fs = probe.get("occupancy"), probe.get("free_space")
    if isinstance(occ, dict) and isinstance(occ.get("differences"), dict) and isinstance(fs, dict):
        L += ["| difference | occupancy IoU [95 % CI] | free-space R² [95 % CI] | "
              "free-space MAE m [95 % CI] |", "|---|---|---|---|"]
        for name, d in occ["differences"].items():
            f = fs.get("differences", {}).get(name, {})
            L.append(f"| {name} | {_ci3(d.get('iou'))} ({_verdict(d.get('iou'))}) | "
                     f"{_ci3(f.get('r2'))} ({_verdict(f.get('r2'))}) | "
                     f"{_ci3(f.get('mae_m'))} ({_verdict(f.get('mae_m'), False)}) |")
        L += ["", "| features | occupancy IoU | free-space R² | free-space MAE m |",
              "|---|---|---|---|"]
        for name in probe.get("feature_sets", []):
            o, r = occ.get(name, {}), fs.get(name, {})
            L.append(f"| {name} | {num(o.get('iou'), '.3f')} | {num(r.get('r2'), '.3f')} | "
                     f"{num(r.get('mae_m'), '.2f')} |")
        L.append("")
        return L + _probe_figures(figs or {})
    L += ["| probe number | value |", "|---|---|"]
    rows = _flat_numbers(probe)
    for k, v in rows[:80]:
        L.append(f"| {k} | {v if isinstance(v, list) else num(v, '.4g')} |")
    if len(rows) > 80:
        L.append(f"| … {len(rows) - 80} more in report.json | |")
    return L + [""]


def _probe_figures(figs: dict[str, str]) -> list[str]:
    L = []
    if "reconstructions" in figs:
        L += ["Held-out drives (drives the pretraining never saw), the LiDAR BEV masked at the "
              "pretraining's ratio and reconstructed by the checkpoint:", "",
              f"![reconstructions]({figs['reconstructions']})", ""]
    if "probe predictions" in figs:
        L += ["What the linear probes read from each feature set, on held-out samples:", "",
              f"![probe predictions]({figs['probe predictions']})", ""]
    return L


def domain_gap_section(meta: dict, figs: dict[str, str]) -> list[str]:
    """rl.domain_gap's record: the shift the encoder sees between the simulator's BEV and the
    pretraining data's, and what that does and does not show."""
    gap = meta.get("domain_gap")
    L = ["## The domain gap: the simulator's BEV next to the pretraining data's", ""]
    if gap is None:
        return L + [f"Not measured ({meta.get('domain_gap_missing', 'rl.domain_gap did not run')})"
                    ".", ""]
    L += [f"From `{meta.get('domain_gap_path')}` (rl.domain_gap): {gap.get('n_etl', DASH)} "
          f"held-out samples of `{gap.get('data', DASH)}` ({gap.get('data_note', DASH)}) against "
          f"{gap.get('n_sim', DASH)} simulator samples on {', '.join(gap.get('tracks', []))}; "
          f"modalities {', '.join(gap.get('modalities', []))}.", "",
          "| model | masked LiDAR error / predicting zeros, pretraining data | the same, "
          "simulator | Fréchet distance ÷ within-data floor | domain classifier accuracy |",
          "|---|---|---|---|---|"]
    for name, m in gap.get("models", {}).items():
        L.append(f"| {name} | {_ci3(m.get('etl', {}).get('recon_relative'), '{:.3f}')} | "
                 f"{_ci3(m.get('sim', {}).get('recon_relative'), '{:.3f}')} | "
                 f"{num(m.get('frechet_ratio'), '.1f')} | "
                 f"{num(m.get('domain_classifier_accuracy'), '.3f')} |")
    L.append("")
    if "domain gap" in figs:
        L += [f"![domain gap]({figs['domain gap']})", ""]
    L += [*gap.get("reading", []), ""]
    return L


def markdown(cfg: StudyConfig, meta: dict, data: dict, agg: dict, figs: dict[str, str],
             time_spent: dict[str, Any] | None = None) -> str:
    n_seeds = len(cfg.seeds)
    train = data["conditions"][0]
    L = [f"# Does pretraining help? — study `{cfg.name}`", ""]
    L += [f"- command: `{meta.get('command', DASH)}`",
          f"- git commit: `{meta.get('commit', DASH)}`; study config hash "
          f"`{meta.get('config_hash', DASH)}` ({meta.get('config_path', DASH)})",
          f"- machine: {meta.get('machine', DASH)}",
          f"- built: {meta.get('built', DASH)}", ""]
    d = meta.get("data", {})
    L += ["## What the encoders saw and the budgets", "",
          f"- pretraining data: **{d.get('kind', DASH)}** — {d.get('description', DASH)}",
          f"- pretraining: {meta.get('pretrain', DASH)}",
          f"- PPO, every arm: {meta.get('rl', DASH)}",
          f"- evaluation: {meta.get('eval', DASH)}",
          f"- seeds per arm: {n_seeds} ({', '.join(map(str, cfg.seeds))}); intervals: 95 % "
          f"stratified bootstrap, {cfg.report.reps} resamples (rliable), seed "
          f"{cfg.report.seed}", ""]
    L += probe_section(meta, figs)
    L += domain_gap_section(meta, figs)
    L += [f"## Training track(s): {', '.join(train.tracks)}", "",
          "IQM over runs × tracks [95 % CI]; n = runs evaluated / seeds.", "",
          "| arm | n | laps | clean episodes | lap time (s) | AUC (laps) | "
          "steps to first lap |", "|---|---|---|---|---|---|---|"]
    for arm in cfg.arms:
        a = agg["arms"][arm]
        fl = a["first_lap"]
        L.append(f"| {ARM_LABELS[arm]} | {a['laps']['runs']}/{n_seeds} | {_ci(a['laps'])} | "
                 f"{_ci(a['clean'])} | {_ci(a['lap_time'], '.1f')} (n={a['lap_time']['runs']}) | "
                 f"{_ci(a['auc'], '.3f')} | {_ci(fl, ',.0f')} (reached {fl['reached']}/"
                 f"{fl['trained']}) |")
    L += ["", "Probability of improvement over scratch, P(arm > scratch) [95 % CI] (0.5: no "
          "difference):", "", "| arm | laps | clean episodes | AUC |", "|---|---|---|---|"]
    for arm, s in agg["improvement_over_scratch"].items():
        L.append(f"| {ARM_LABELS[arm]} | {_p(s['laps'])} | {_p(s['clean'])} | "
                 f"{_p(s['auc'])} |")
    L.append("")
    conds = data["conditions"][1:]
    if conds:
        L += ["## Without retraining: sensor faults and unseen tracks", "",
              "Laps in the time limit, IQM [95 % CI] (n runs); clean-episode rate below.", "",
              "| condition | tracks | " + " | ".join(ARM_LABELS[a] for a in cfg.arms) + " |",
              "|---|---|" + "---|" * len(cfg.arms)]
        for c in conds:
            cells = []
            for a in cfg.arms:
                s = agg["arms"][a]["conditions"][c.name]
                cells.append(f"{_ci(s['laps'])} (n={s['laps']['runs']}) · clean "
                             f"{_ci(s['clean'])}")
            L.append(f"| {c.name} | {', '.join(c.tracks)} | " + " | ".join(cells) + " |")
        L.append("")
    rest = {k: v for k, v in figs.items() if k != "domain gap"}  # shown in its section
    if rest:
        L += ["## Figures", ""]
        L += [f"![{k}]({v})" for k, v in rest.items()]
        L.append("")
    L += ["## Missing or failed", ""]
    if data["missing"]:
        L += [f"{len(data['missing'])} units have no result (left out of the aggregates "
              "above; report.json lists each):", ""]
        L += missing_lines(data["missing"])
    else:
        L.append("Nothing: every run and evaluation is in.")
    L.append("")
    if time_spent is not None:
        L += timing_section(time_spent)
    L += ["## Every run", "", "| arm | seed | laps (train) | clean | AUC | first lap at | "
          "final return | train wall s |", "|---|---|---|---|---|---|---|---|"]
    for arm in cfg.arms:
        for seed, rec in sorted(data["runs"][arm].items()):
            per = rec["conditions"].get("train")
            laps = DASH if per is None else num(np.mean([v["laps"] for v in per.values()]),
                                                ".2f")
            clean = DASH if per is None else num(np.mean([v["clean"] for v in per.values()]),
                                                 ".2f")
            L.append(f"| {arm} | {seed} | {laps} | {clean} | {num(rec.get('auc'), '.3f')} | "
                     f"{num(rec.get('first_lap'), ',.0f')} | "
                     f"{num(rec.get('final_return'), '.1f')} | {num(rec.get('wall_s'), '.0f')} |")
    L += ["", "Method: see `rl/study_report.py` (what each score is, how it is aggregated)."]
    return "\n".join(L) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, Condition):
        return {"name": x.name, "group": x.group, "tracks": list(x.tracks),
                "lidar_noise": x.lidar_noise, "lidar_drop": x.lidar_drop,
                "imu_absent": x.imu_absent}
    return x


def build_report(cfg: StudyConfig, base: RLConfig, meta: dict[str, Any],
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Read every run, aggregate, draw, write ``report.md``, ``report.json`` and
    ``figures/`` into the study folder (and copy them to ``report.copy_to``); returns the
    JSON record."""
    lay = Layout.of(cfg)
    lay.root.mkdir(parents=True, exist_ok=True)
    log("reading runs")
    data = collect(cfg, base)
    log(f"aggregating ({cfg.report.reps} bootstrap resamples per interval)")
    agg = aggregate(cfg, data)
    figs: dict[str, str] = {}
    curves, p = learning_curves(cfg, data, lay.figures / "learning_curves.png")
    for name, path in (("learning curves", p),
                       ("performance profiles", profiles(cfg, data,
                                                         lay.figures / "profiles.png")),
                       ("intervals", interval_figure(cfg, agg, lay.figures / "intervals.png")),
                       ("robustness", robustness_figure(cfg, data, agg,
                                                        lay.figures / "robustness.png"))):
        if path is not None:
            figs[name] = Path(path).relative_to(lay.root).as_posix()
    gap_png = lay.domain_gap / "bev_side_by_side.png"
    if meta.get("domain_gap") is not None and gap_png.is_file():
        lay.figures.mkdir(parents=True, exist_ok=True)
        shutil.copy2(gap_png, lay.figures / "domain_gap_bev.png")
        figs["domain gap"] = "figures/domain_gap_bev.png"
    probe_json = lay.probe_json()
    if meta.get("probe") is not None and probe_json is not None:
        # §1: the checkpoint's reconstructions of held-out drives and what the probes read
        for key, src, dst in (("reconstructions", "recon_lidar.png", "probe_recon_lidar.png"),
                              ("probe predictions", "probe_examples.png", "probe_examples.png")):
            if (probe_json.parent / src).is_file():
                lay.figures.mkdir(parents=True, exist_ok=True)
                shutil.copy2(probe_json.parent / src, lay.figures / dst)
                figs[key] = f"figures/{dst}"
    record = {"meta": meta, "arms": list(cfg.arms), "seeds": list(cfg.seeds),
              "baseline": BASELINE, "reference": REFERENCE,
              "conditions": data["conditions"], "budget_env_steps": data["budget"],
              "runs": data["runs"], "missing": data["missing"], "aggregate": agg,
              "learning_curves": curves, "figures": figs, "timing": timing(cfg, base)}
    (lay.root / "report.json").write_text(json.dumps(_jsonable(record), indent=2))
    (lay.root / "report.md").write_text(markdown(cfg, meta, data, agg, figs, record["timing"]))
    if cfg.report.copy_to:
        dst = Path(cfg.report.copy_to)
        (dst / "figures").mkdir(parents=True, exist_ok=True)
        for f in ("report.md", "report.json"):
            shutil.copy2(lay.root / f, dst / f)
        for f in figs.values():
            shutil.copy2(lay.root / f, dst / f)
    log(f"wrote {lay.root}/report.md, report.json, {len(figs)} figures")
    return record
