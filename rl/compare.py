"""Compare PPO variants over seeds: train each (or reuse its run), evaluate each in the
standard protocol, and report per variant the mean ± std, median and IQR over seeds.

    python -m rl.compare --config configs/rl_compare_init.toml \
        --variant pretrained:finetune.init=pretrained \
        --variant scratch:finetune.init=scratch \
        --seeds 0,1,2 --tracks austria,berlin --episodes 5 --out runs/compare_init

The question the project exists to answer — does pretraining help? — is a comparison of
this kind: the same config, architecture, budget and seeds, differing only in
``finetune.init`` (or ``freeze_encoders``, or the modalities). A variant is
``NAME:KEY=VALUE[,KEY=VALUE...]`` (any ``--set`` override of rl.ppo). Each variant × seed is
the run ``<run_name>_<NAME>_s<SEED>`` under ``runs_dir``: trained by rl.ppo (resumed if it
stopped early, skipped if complete — so on a cluster the runs can be separate jobs and this
command, with ``--no-train``, only evaluates and aggregates), then evaluated by rl.evaluate
(``--collision`` protocol, grid start, deterministic policy).

Writes to ``--out``: ``compare.json`` (every run's evaluation and the aggregates: per variant
and track, over seeds, the mean ± std, median and interquartile range of laps, lap time and
collisions per km, and the clean fraction — collision-free episodes over all episodes, pooled
over seeds), ``compare.md`` (two tables per protocol: mean ± std over seeds with the final
training return; median [Q1, Q3] over seeds with the clean episodes), and ``curves.png``
(learning curves per variant: the mean over seeds with the min-max band). With 3 seeds the
median is the middle seed and the quartiles interpolate between seeds: robust to one bad
seed, not an interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from etl import configlib
from rl.fmt import DASH, finite, num, pm
from rl.plots import CURVES, plot_curves, read_curve


def log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def _top_level_split(text: str) -> list[str]:
    """Split at the commas outside brackets, braces and quotes (``a=[1,2],b=3``)."""
    parts, depth, quote, cur = [], 0, "", []
    for c in text:
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(c)
    parts.append("".join(cur))
    return parts


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name:k=v,k=v`` → (name, ["k=v", "k=v"]); a bare ``name`` is the config as is. A
    value may hold commas inside brackets or braces (``env.randomize.lidar_noise=[0,0.03]``)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise configlib.ConfigError(f"--variant {text!r}: the name must be [A-Za-z0-9._-]+")
    sets = [s.strip() for s in _top_level_split(rest) if s.strip()] if rest else []
    for s in sets:
        if "=" not in s:
            raise configlib.ConfigError(f"--variant {text!r}: {s!r} is not KEY=VALUE")
    return name, sets


ROBUST = ("laps", "lap_time", "collisions_per_km")  # per-seed values with median and IQR


def seed_stats(values: list[float | None]) -> dict[str, float | None]:
    """Statistics over seeds of one number per seed (None / NaN values — a seed with no
    completed lap has no lap time — are left out and not counted in ``n``): mean ± std
    (population std, ddof 0), median, the quartiles ``q25``/``q75`` (numpy's default linear
    interpolation) and the interquartile range ``iqr = q75 - q25``."""
    a = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if a.size == 0:
        return {"mean": None, "std": None, "median": None, "q25": None, "q75": None,
                "iqr": None, "n": 0}  # fmt: skip
    q25, med, q75 = np.percentile(a, [25.0, 50.0, 75.0])
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(med),
            "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25), "n": int(a.size)}


def _clean_counts(res: dict) -> tuple[int, int]:
    """(collision-free episodes, episodes) of one run's result on one track."""
    eps = res.get("episodes")
    if isinstance(eps, list) and eps:
        return sum(bool(e["collision_free"]) for e in eps), len(eps)
    a = res["aggregate"]
    n = int(a.get("episodes", 0))
    return int(round(a["collision_free_fraction"] * n)), n


def aggregate(runs: dict[str, dict[int, dict]], mode: str) -> dict[str, Any]:
    """Per variant and track, over seeds (each seed's number: its run's per-track aggregate):
    :func:`seed_stats` of laps, lap time, collisions/km and the collision-free fraction, and
    ``clean``: collision-free episodes over all episodes, pooled over the seeds."""
    out: dict[str, Any] = {}
    for variant, by_seed in runs.items():
        tracks: dict[str, dict] = {}
        clean: dict[str, list[int]] = {}
        for rec in by_seed.values():
            for name, res in rec["eval"]["results"][mode]["tracks"].items():
                a = res["aggregate"]
                t = tracks.setdefault(name, {"laps": [], "lap_time": [], "collisions_per_km": [],
                                             "collision_free_fraction": []})
                t["laps"].append(a["laps_mean"])
                t["lap_time"].append(a["lap_time_mean"])
                t["collisions_per_km"].append(a["collisions_per_km"])
                t["collision_free_fraction"].append(a["collision_free_fraction"])
                k, n = _clean_counts(res)
                c = clean.setdefault(name, [0, 0])
                c[0], c[1] = c[0] + k, c[1] + n
        out[variant] = {
            "tracks": {n: {**{k: seed_stats(v) for k, v in t.items()},
                           "clean": {"episodes": clean[n][1], "clean_episodes": clean[n][0],
                                     "fraction": clean[n][0] / clean[n][1] if clean[n][1]
                                     else None}}
                       for n, t in tracks.items()},
            "final_return": seed_stats([rec["final_return"] for rec in by_seed.values()]),
            "seeds": sorted(by_seed),
        }  # fmt: skip
    return out


def _fmt(s: dict, digits: int = 2) -> str:
    return pm(s["mean"], s["std"], f".{digits}f")


def _fmt_median(s: dict, digits: int = 2) -> str:
    if finite(s.get("median")) is None:
        return DASH
    f = f".{digits}f"
    return f"{num(s['median'], f)} [{num(s['q25'], f)}, {num(s['q75'], f)}]"


def _fmt_clean(c: dict) -> str:
    if not c["episodes"]:
        return DASH
    return f"{c['clean_episodes']}/{c['episodes']} ({num(c['fraction'], '.0%')})"


def markdown(agg: dict[str, Any], mode: str, header: str) -> str:
    """Two tables: mean ± std over seeds; median [Q1, Q3] over seeds and the clean episodes."""
    tracks = sorted({t for v in agg.values() for t in v["tracks"]})
    lines = [header, "", f"Evaluation protocol: `{mode}` (mean ± std over seeds)", "",
             "| variant | seeds | final train return | "
             + " | ".join(f"{t}: laps / lap s / coll/km" for t in tracks) + " |",
             "|---|---|---|" + "---|" * len(tracks)]
    for name, v in agg.items():
        cells = []
        for t in tracks:
            s = v["tracks"].get(t)
            cells.append(DASH if s is None else
                         f"{_fmt(s['laps'])} / {_fmt(s['lap_time'], 1)} / "
                         f"{_fmt(s['collisions_per_km'], 0)}")
        lines.append(f"| {name} | {len(v['seeds'])} | {_fmt(v['final_return'], 1)} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Evaluation protocol: `{mode}` (median [Q1, Q3] over seeds; clean: "
              "collision-free episodes / episodes, pooled over seeds)", "",
              "| variant | seeds | "
              + " | ".join(f"{t}: laps / lap s / coll/km / clean" for t in tracks) + " |",
              "|---|---|" + "---|" * len(tracks)]
    for name, v in agg.items():
        cells = []
        for t in tracks:
            s = v["tracks"].get(t)
            cells.append(DASH if s is None else
                         f"{_fmt_median(s['laps'])} / {_fmt_median(s['lap_time'], 1)} / "
                         f"{_fmt_median(s['collisions_per_km'], 0)} / {_fmt_clean(s['clean'])}")
        lines.append(f"| {name} | {len(v['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the base rl.ppo TOML config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every variant (e.g. ppo.total_timesteps=1000000)")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:K=V,...",
                    help="a variant: its name and its overrides of the base config")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--tracks", default="austria", help="evaluation tracks")
    ap.add_argument("--backend", default="jax", choices=("jax", "bullet", "racecar_gym"),
                    help="evaluation backend")
    ap.add_argument("--episodes", type=int, default=5)
    ap.add_argument("--time-limit", type=float, help="evaluation seconds (default: config's)")
    ap.add_argument("--collision", default="config",
                    choices=("config", "terminate", "continue", "both"))
    ap.add_argument("--no-train", action="store_true",
                    help="only evaluate and aggregate runs that exist (trained elsewhere)")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)

    from rl import evaluate, ppo
    from rl.config import load_config

    try:
        variants = [parse_variant(v) for v in args.variant]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if len({n for n, _ in variants}) != len(variants):
            raise configlib.ConfigError("--variant: two variants share a name")
        base = load_config(args.config, args.set)
        cfgs = {(name, seed): load_config(args.config, [
            *args.set, *sets, f"seed={seed}", f"run_name={base.run_name}_{name}_s{seed}"])
            for name, sets in variants for seed in seeds}  # fmt: skip
    except (configlib.ConfigError, ValueError) as e:
        return configlib.cli_error("rl.compare", e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, dict]] = {}
    curves: dict[str, list[dict]] = {}
    for (name, seed), cfg in cfgs.items():
        run_dir = Path(cfg.runs_dir) / cfg.run_name
        if not args.no_train and not ppo.run_is_complete(cfg):
            log(f"train {cfg.run_name}")
            code = ppo.run(cfg)
            if code != 0:
                log(f"{cfg.run_name}: rl.ppo exited {code}; stopping")
                return code
        if not (run_dir / "ckpt").exists():
            print(f"rl.compare: {run_dir}/ckpt: no checkpoint (train it, or drop --no-train)",
                  file=sys.stderr)
            return 1
        ev_dir = out / "eval" / cfg.run_name
        ev_args = ["--ckpt", str(run_dir / "ckpt"), "--tracks", args.tracks,
                   "--backend", args.backend, "--episodes", str(args.episodes),
                   "--collision", args.collision, "--out", str(ev_dir), "--no-plots"]
        if args.time_limit is not None:
            ev_args += ["--time-limit", str(args.time_limit)]
        log(f"evaluate {cfg.run_name}")
        code = evaluate.main(ev_args)
        if code != 0:
            return code
        report = json.loads((ev_dir / "metrics.json").read_text())
        metrics = run_dir / "metrics.jsonl"
        _, ret = read_curve(metrics, "episode/ep_return")
        runs.setdefault(name, {})[seed] = {
            "run": str(run_dir), "eval": report,
            "final_return": float(ret[-5:].mean()) if len(ret) else None}
        curves.setdefault(name, []).append({label: read_curve(metrics, keys)
                                            for label, keys in CURVES})
    modes = list(next(iter(next(iter(runs.values())).values()))["eval"]["results"])
    result = {"command": "python -m rl.compare " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
              "variants": {n: s for n, s in variants}, "seeds": seeds,
              "aggregate": {m: aggregate(runs, m) for m in modes},
              "runs": {n: {str(s): r for s, r in by.items()} for n, by in runs.items()}}
    (out / "compare.json").write_text(json.dumps(evaluate._json_safe(result), indent=2))
    md = "".join(markdown(result["aggregate"][m], m, f"# {base.run_name}: "
                          + " vs ".join(n for n, _ in variants)) for m in modes)
    (out / "compare.md").write_text(md)
    png = plot_curves(curves, out / "curves.png", base.run_name)
    print(md)
    log(f"wrote {out}/compare.json, compare.md" + (", curves.png" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
