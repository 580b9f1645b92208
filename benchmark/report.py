"""Summarise TensorBoard runs of the injection scripts as a Markdown table (and optionally a plot).

Finds every folder holding `events.out.tfevents.*` files under the given paths (default `runs/`), reads the
run name `{env_id}__{exp_name}__{seed}__{time}` from the folder name (an env id with a '/', e.g.
`ALE/Phoenix-v5`, makes a sub-folder; that is handled) and groups runs by (env_id, exp_name). For each
group and each `--key` (default `eval/episodic_return`; repeatable, e.g. `--key eval/success_rate`) the
table gives:

* final: the value logged at each run's LAST step of that key, mean ± std over the runs (one per seed;
  std with ddof 0, i.e. 0.00 for a single seed);
* `@STEP` for every `--at-step STEP`: each run's last value logged at a step <= STEP, mean ± std
  ("n/a" when no run logged the key by then; "(k/n)" when only k of the n runs had);
* n: the number of seeds, the seeds themselves and the last step reached (a range when runs differ, which
  flags unfinished runs);
* injections: the steps at which `injection/count` was logged ("(k/n runs)" when not every run injected there).

If the same (env_id, exp_name, seed) was run more than once, the latest run (largest time) is used and a note
is printed to stderr. A key missing from some runs is an error that names those runs (and the keys they have).
`--plot out.png` draws, for each key, mean ± std over seeds per group (each run linearly interpolated onto the
union of the group's steps, inside its own step range) with dashed vertical lines at the injection steps.

    python benchmark/report.py                                   # runs/ in the current directory
    python benchmark/report.py runs --key eval/episodic_return --key eval/success_rate --at-step 40000
    python benchmark/report.py /scratch/exp1/runs --only no_injection inject_5M --plot phoenix.png
"""

import argparse
import math
import os
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_checks.py, also when this file is imported by path
from cli_checks import Parser, at_least, did_you_mean, finite_problem, folder_problem, seed_problem  # noqa: E402

INJECTION_KEY = "injection/count"


class ReportError(Exception):
    """Bad input: printed as one `error: ...` line, exit code 2."""


def parse_run_name(name: str):
    """'{env_id}__{exp_name}__{seed}__{time}' -> (env_id, exp_name, seed, time) or None."""
    parts = name.split("__")
    if len(parts) < 4 or not re.fullmatch(r"-?\d+", parts[-2]) or not re.fullmatch(r"\d+", parts[-1]):
        return None
    return parts[0], "__".join(parts[1:-2]), int(parts[-2]), int(parts[-1])


def find_runs(paths) -> list:
    runs, skipped = [], []
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise ReportError(f"{p}: no such file or directory")
        dirs = sorted({f.parent for f in root.rglob("events.out.tfevents.*")} if root.is_dir() else set())
        for d in dirs:
            rel = d.relative_to(root).as_posix()
            parsed = parse_run_name(d.name if rel == "." else rel)
            if parsed is None:
                skipped.append(str(d))
                continue
            env_id, exp, seed, t = parsed
            runs.append(dict(path=d, env_id=env_id, exp_name=exp, seed=seed, time=t))
    for d in skipped:
        print(f"note: skipping {d}: its name is not {{env_id}}__{{exp_name}}__{{seed}}__{{time}}", file=sys.stderr)
    if not runs:
        raise ReportError(
            f"no runs found under {', '.join(map(str, paths))} (looked for run folders named "
            "{env_id}__{exp_name}__{seed}__{time} holding events.out.tfevents.* files)"
        )
    return runs


def read_scalars(run_dir: Path, keys) -> dict:
    """{key: {step: value}} for the wanted keys (the last write of a step wins), from every event file in
    the folder in file-name (creation) order. A resumed run's purge (its file starts with a SessionLog START at the
    checkpoint's step) hides what the stopped run logged from that step on, as TensorBoard does."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = {k: {} for k in keys}
    all_tags = set()
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        try:
            for ev in EventFileLoader(str(f)).Load():
                if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                    out = {k: {s: v for s, v in vals.items() if s < ev.step} for k, vals in out.items()}
                if not ev.HasField("summary"):
                    continue
                for v in ev.summary.value:
                    all_tags.add(v.tag)
                    if v.tag not in out:
                        continue
                    if v.HasField("simple_value"):
                        val = float(v.simple_value)
                    elif v.HasField("tensor"):
                        val = float(tensor_util.make_ndarray(v.tensor).reshape(-1)[0])
                    else:
                        continue
                    out[v.tag][int(ev.step)] = val
        except Exception as e:  # a truncated/corrupt file of a run still being written: keep what was read
            print(f"note: {f}: stopped reading ({type(e).__name__}: {e})", file=sys.stderr)
    return out, all_tags


def mean_std(xs):
    n = len(xs)
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / n)


def fmt(xs, prec, n_total):
    if not xs:
        return "n/a"
    m, s = mean_std(xs)
    cell = f"{m:.{prec}f} ± {s:.{prec}f}"
    return cell if len(xs) == n_total else f"{cell} ({len(xs)}/{n_total})"


def value_at(series: dict, step: int):
    ok = [s for s in series if s <= step]
    return series[max(ok)] if ok else None


def collect(paths, keys, only=None, optional=()) -> tuple:
    """Groups: list of dicts (env_id, exp_name, runs=[run with 'scalars']); and one line per run left out because it
    has not logged a --key that other runs have (still running, or died early)."""
    runs = find_runs(paths)
    if only:
        have = {r["exp_name"] for r in runs}
        missing = [o for o in only if o not in have]
        if missing:
            raise ReportError(f"--only {missing[0]}: no runs with that exp_name (have: {', '.join(sorted(have))})")
        runs = [r for r in runs if r["exp_name"] in only]
    latest = {}
    for r in runs:
        k = (r["env_id"], r["exp_name"], r["seed"])
        if k in latest:
            old = latest[k]
            keep, drop = (r, old) if (r["time"], str(r["path"])) > (old["time"], str(old["path"])) else (old, r)
            print(
                f"note: {k[1]} seed {k[2]} was run more than once; using {keep['path']}, not {drop['path']}",
                file=sys.stderr,
            )
            latest[k] = keep
        else:
            latest[k] = r
    runs = list(latest.values())
    missing = defaultdict(list)
    for r in runs:
        r["scalars"], r["tags"] = read_scalars(r["path"], list(dict.fromkeys([*keys, *optional, INJECTION_KEY])))
        for k in keys:
            if not r["scalars"][k]:
                missing[k].append(r)
    not_started = []
    for k, rs in missing.items():
        rs = [r for r in rs if r in runs]  # a run without two keys is left out once
        if rs and len(rs) < len(runs):  # runs still in progress, or that died before logging it: listed, left out
            lines = [f"partial: {r['env_id']} {r['exp_name']} seed {r['seed']} has no {k} ({r['path']})" for r in rs]
            print("\n".join(lines), file=sys.stderr)
            not_started += lines
            runs = [r for r in runs if r not in rs]
            continue
        if not rs:
            continue
        have = sorted(t for t in rs[0]["tags"] if not t.startswith("plasticity/"))
        names = ", ".join(str(r["path"]) for r in rs[:5]) + (f" and {len(rs) - 5} more" if len(rs) > 5 else "")
        raise ReportError(
            f"--key {k}: missing in {len(rs)} of {len(runs)} runs: {names}{did_you_mean(k, tags_of(runs))} "
            f"(keys in {rs[0]['path'].name}: {', '.join(have) or 'none'})"
        )
    groups = defaultdict(list)
    for r in runs:
        groups[(r["env_id"], r["exp_name"])].append(r)
    # order: by env, then by the start time of the group's first run (a sweep's setup order), then name
    order = sorted(groups, key=lambda g: (g[0], min(r["time"] for r in groups[g]), g[1]))
    grouped = [dict(env_id=g[0], exp_name=g[1], runs=sorted(groups[g], key=lambda r: r["seed"])) for g in order]
    return grouped, not_started


def tags_of(runs) -> set:
    """Every key logged by any of the runs (read by collect)."""
    return set().union(*(r["tags"] for r in runs))


def injection_cell(runs) -> str:
    seen = defaultdict(int)
    for r in runs:
        for s in r["scalars"][INJECTION_KEY]:
            seen[s] += 1
    if not seen:
        return "–"
    return ", ".join(str(s) if c == len(runs) else f"{s} ({c}/{len(runs)} runs)" for s, c in sorted(seen.items()))


def table(groups, keys, at_steps=(), prec=2) -> str:
    multi_env = len({g["env_id"] for g in groups}) > 1
    head = (["env"] if multi_env else []) + ["setup"]
    for k in keys:
        head.append(f"{k} final")
        head += [f"{k} @{s}" for s in at_steps]
    head += ["n", "seeds", "last step", "injections"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        rs = g["runs"]
        row = ([g["env_id"]] if multi_env else []) + [g["exp_name"]]
        for k in keys:
            row.append(fmt([r["scalars"][k][max(r["scalars"][k])] for r in rs], prec, len(rs)))
            for s in at_steps:
                row.append(fmt([v for v in (value_at(r["scalars"][k], s) for r in rs) if v is not None], prec, len(rs)))
        last = [max(max(r["scalars"][k]) for k in keys) for r in rs]
        row += [
            str(len(rs)),
            " ".join(str(r["seed"]) for r in rs),
            str(min(last)) if min(last) == max(last) else f"{min(last)}–{max(last)}",
            injection_cell(rs),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(groups, keys, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 3.6 * len(keys)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    multi_env = len({g["env_id"] for g in groups}) > 1
    for ax, k in zip(axes[:, 0], keys):
        for i, g in enumerate(groups):
            c = colors[i % len(colors)]
            grid = np.array(sorted({s for r in g["runs"] for s in r["scalars"][k]}), dtype=float)
            ys = []
            for r in (r for r in g["runs"] if r["scalars"][k]):
                st = np.array(sorted(r["scalars"][k]), dtype=float)
                y = np.interp(grid, st, [r["scalars"][k][int(s)] for s in st])
                y[(grid < st[0]) | (grid > st[-1])] = np.nan
                ys.append(y)
            m, lo, hi = bootstrap_band(np.array(ys))
            label = (f"{g['env_id']} " if multi_env else "") + f"{g['exp_name']} (n={len(g['runs'])})"
            ax.plot(grid, m, color=c, label=label)
            ax.fill_between(grid, lo, hi, color=c, alpha=0.2, linewidth=0)
            for st in sorted({s for r in g["runs"] for s in r["scalars"][INJECTION_KEY]}):
                ax.axvline(st, color=c, linestyle="--", linewidth=1, alpha=0.8)
        ax.set_xlabel("global step")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title("mean over seeds, 95% bootstrap band; dashed: injection steps")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------- honest statistics (rliable) and figures
# Human-normalised Atari scores (score - random) / (human - random), with the random and human reference scores of
# Mnih et al. (2015) / Badia et al. (2020) for the games our recipes use.
ATARI_REFERENCE = {
    "Alien": (227.8, 7127.7),
    "Asterix": (210.0, 8503.3),
    "BeamRider": (363.9, 16926.5),
    "Breakout": (1.7, 30.5),
    "Enduro": (0.0, 860.5),
    "MsPacman": (307.3, 6951.6),
    "Phoenix": (761.4, 7242.6),
    "Pong": (-20.7, 14.6),
    "Qbert": (163.9, 13455.0),
    "Seaquest": (68.4, 42054.7),
    "SpaceInvaders": (148.0, 1668.7),
}


def normaliser(env_id: str, key: str):
    """(label, f) turning raw returns of a known Atari game into human-normalised scores; None otherwise."""
    m = re.fullmatch(r"(?:ALE/)?([A-Za-z]+?)(?:NoFrameskip-v4|-v5)", env_id)
    if m is None or m.group(1) not in ATARI_REFERENCE or not key.endswith("episodic_return"):
        return None
    random_score, human = ATARI_REFERENCE[m.group(1)]
    return "human-normalised", lambda x: (np.asarray(x, dtype=float) - random_score) / (human - random_score)


def split_complete(groups, key, steps=None, seeds=None):
    """Complete runs per group, and one line per missing or partial run. A run is partial when its last step of
    `key` is below `steps` (default: the largest last step of any run of that env); a seed is missing when another
    group of the env (or --seeds) has it and this group does not."""
    problems, complete = [], {}
    for env in sorted({g["env_id"] for g in groups}):
        env_groups = [g for g in groups if g["env_id"] == env]
        target = steps or max(max(r["scalars"][key]) for g in env_groups for r in g["runs"])
        wanted = set(seeds or {r["seed"] for g in env_groups for r in g["runs"]})
        for g in env_groups:
            done = [r for r in g["runs"] if max(r["scalars"][key]) >= target]
            for r in g["runs"]:
                if r not in done:
                    problems.append(
                        f"partial: {env} {g['exp_name']} seed {r['seed']} stops at step "
                        f"{max(r['scalars'][key])} of {target} ({r['path']})"
                    )
            for s in sorted(wanted - {r["seed"] for r in g["runs"]}):
                problems.append(f"missing: {env} {g['exp_name']} seed {s}")
            complete[(env, g["exp_name"])] = done
    return complete, problems


def score_matrices(groups, complete, key):
    """{setup: runs x envs matrix of final values}, over the seeds every env of the setup has complete;
    Atari returns human-normalised. Returns (matrices, label)."""
    setups = list(dict.fromkeys(g["exp_name"] for g in groups))
    envs = sorted({g["env_id"] for g in groups})
    label, out = key, {}
    for setup in setups:
        runs = {env: {r["seed"]: r for r in complete.get((env, setup), [])} for env in envs}
        seeds = sorted(set.intersection(*(set(v) for v in runs.values())))
        if not seeds:
            continue
        cols = []
        for env in envs:
            col = [runs[env][s]["scalars"][key][max(runs[env][s]["scalars"][key])] for s in seeds]
            norm = normaliser(env, key)
            if norm is not None:
                label, col = f"{key} ({norm[0]})", norm[1](col)
            cols.append(np.asarray(col, dtype=float))
        out[setup] = np.stack(cols, axis=1)
    return out, label


def iqm_mean_intervals(matrices: dict, reps: int, seed: int = 0) -> dict:
    """{setup: (iqm, iqm_low, iqm_high, mean, mean_low, mean_high)}: rliable's stratified bootstrap, 95% CIs."""
    from rliable import library as rly
    from rliable import metrics

    aggregate = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])  # noqa: E731
    with warnings.catch_warnings():  # arch's notice about its future default generator
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates(matrices, aggregate, reps=reps, random_state=np.random.RandomState(seed))
    return {k: (point[k][0], ci[k][0, 0], ci[k][1, 0], point[k][1], ci[k][0, 1], ci[k][1, 1]) for k in matrices}


def improvement(matrices: dict, baseline: str, reps: int, seed: int = 0) -> dict:
    """{setup: (P(setup > baseline), low, high)}: rliable's probability of improvement with a 95% CI."""
    from rliable import library as rly
    from rliable import metrics

    pairs = {s: (m, matrices[baseline]) for s, m in matrices.items() if s != baseline}
    if not pairs:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates(
            pairs, metrics.probability_of_improvement, reps=reps, random_state=np.random.RandomState(seed)
        )
    return {k: (float(np.ravel(point[k])[0]), *map(float, np.ravel(ci[k])[:2])) for k in pairs}


def steps_to_threshold(series: dict, threshold: float):
    """First step at which the run's value reaches `threshold` (>=), None if it never does."""
    return next((s for s in sorted(series) if series[s] >= threshold), None)


def area_under_curve(series: dict) -> float:
    """Mean value over the run: trapezoid area under the curve divided by the steps it spans."""
    st = np.array(sorted(series), dtype=float)
    ys = np.array([series[int(s)] for s in st])
    return float(ys[0]) if len(st) == 1 else float(np.trapezoid(ys, st) / (st[-1] - st[0]))


def stats_tables(groups, complete, problems, key, reps, baseline=None, threshold=None) -> tuple:
    """Markdown: IQM and mean with CIs per setup (all envs together), probability of improvement, speed of
    learning (AUC; steps to --threshold). Returns (markdown, matrices, intervals, improvements)."""
    matrices, label = score_matrices(groups, complete, key)
    if not matrices:
        return f"no complete runs of {key}", matrices, {}, {}
    ivals = iqm_mean_intervals(matrices, reps)
    envs = sorted({g["env_id"] for g in groups})
    head = "| setup | IQM [95% CI] | mean [95% CI] | runs x envs | AUC (mean over the run) |"
    lines = [
        f"**{label}**, final value of complete runs, over {', '.join(envs)}; stratified bootstrap, {reps} "
        f"resamples (rliable)",
        "",
        head + (f" steps to reach {threshold:g} |" if threshold is not None else ""),
        "|---|---|---|---|---|" + ("---|" if threshold is not None else ""),
    ]
    for setup, m in matrices.items():
        q, ql, qh, mu, ml, mh = ivals[setup]
        runs = [r for env in envs for r in complete.get((env, setup), [])]
        aucs = [area_under_curve(r["scalars"][key]) for r in runs]
        row = [
            setup,
            f"{q:.3g} [{ql:.3g}, {qh:.3g}]",
            f"{mu:.3g} [{ml:.3g}, {mh:.3g}]",
            f"{m.shape[0]} x {m.shape[1]}",
            f"{np.mean(aucs):.3g} ± {np.std(aucs):.2g}",
        ]
        if threshold is not None:
            hit = [s for s in (steps_to_threshold(r["scalars"][key], threshold) for r in runs) if s is not None]
            row.append(
                f"median {np.median(hit):.0f} ({len(hit)}/{len(runs)} reached)" if hit else f"never (0/{len(runs)})"
            )
        lines.append("| " + " | ".join(row) + " |")
    better = improvement(matrices, baseline, reps) if baseline in matrices else {}
    if better:
        lines += ["", f"Probability of improvement over `{baseline}` (P(X > Y), 95% CI):", ""]
        lines += [f"- `{s}`: {p:.2f} [{lo:.2f}, {hi:.2f}]" for s, (p, lo, hi) in better.items()]
    lines += ["", "Missing or partial runs (left out of the statistics above):", ""]
    lines += [f"- {p}" for p in problems] or ["- none"]
    return "\n".join(lines), matrices, ivals, better


def bootstrap_band(ys: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple:
    """Mean over runs (rows) and its 95% percentile-bootstrap band, per column (NaN: the run has no value)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ys), size=(reps, len(ys)))
    means = np.nanmean(ys[idx], axis=1)
    return np.nanmean(ys, axis=0), np.nanpercentile(means, 2.5, axis=0), np.nanpercentile(means, 97.5, axis=0)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)  # never a half-written figure


def plot_aggregates(ivals: dict, better: dict, baseline, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 if better else 1
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 0.6 * len(ivals) + 1.6), squeeze=False)
    names = list(ivals)
    for i, (what, (p, lo, hi)) in enumerate((("IQM", (0, 1, 2)), ("mean", (3, 4, 5)))):
        ys = np.arange(len(names)) + (0.15 if i else -0.15)
        x = np.array([ivals[s][p] for s in names])
        err = np.array([[x[j] - ivals[s][lo], ivals[s][hi] - x[j]] for j, s in enumerate(names)]).T
        axes[0, 0].errorbar(x, ys, xerr=err, fmt="o", capsize=4, label=what)
    axes[0, 0].set_yticks(range(len(names)), names)
    axes[0, 0].set_xlabel(label)
    axes[0, 0].legend()
    axes[0, 0].grid(alpha=0.3)
    axes[0, 0].set_title("IQM and mean, 95% stratified-bootstrap CIs")
    if better:
        names = list(better)
        x = np.array([better[s][0] for s in names])
        err = np.array([[x[j] - better[s][1], better[s][2] - x[j]] for j, s in enumerate(names)]).T
        axes[0, 1].errorbar(x, range(len(names)), xerr=err, fmt="o", capsize=4)
        axes[0, 1].axvline(0.5, color="grey", linestyle="--")
        axes[0, 1].set_yticks(range(len(names)), names)
        axes[0, 1].set_xlim(0, 1)
        axes[0, 1].set_title(f"P(setup > {baseline})")
        axes[0, 1].grid(alpha=0.3)
    save_figure(fig, path)


def plot_speed(complete: dict, key: str, threshold, path: Path) -> None:
    """How fast each setup learns, over its complete runs (all envs): the area under the curve (mean value over
    the run) with a 95% bootstrap interval, and with --threshold the fraction of runs that have reached it by each
    step (time to threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = defaultdict(list)
    for (_, setup), rs in complete.items():
        runs[setup] += rs
    runs = {s: rs for s, rs in runs.items() if rs}
    n = 1 if threshold is None else 2
    fig, axes = plt.subplots(1, n, figsize=(6 * n, max(3.5, 0.5 * len(runs) + 1.6)), squeeze=False)
    ax = axes[0, -1]
    for i, rs in enumerate(runs.values()):
        mean, lo, hi = (
            float(v[0]) for v in bootstrap_band(np.array([[area_under_curve(r["scalars"][key])] for r in rs]))
        )
        ax.errorbar(mean, i, xerr=[[mean - lo], [hi - mean]], fmt="o", capsize=4, color=f"C{i}")
    ax.set_yticks(range(len(runs)), list(runs))
    ax.set_xlabel(f"{key}, mean over the run (AUC)")
    ax.set_title("area under the curve, 95% bootstrap CI")
    ax.grid(alpha=0.3)
    if threshold is not None:
        ax = axes[0, 0]
        steps = sorted({st for rs in runs.values() for r in rs for st in r["scalars"][key]})
        for i, (setup, rs) in enumerate(runs.items()):
            hit = [steps_to_threshold(r["scalars"][key], threshold) for r in rs]
            reached = [np.mean([h is not None and h <= t for h in hit]) for t in steps]
            ax.step(steps, reached, where="post", label=setup, color=f"C{i}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"fraction of runs with {key} >= {threshold:g}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("time to threshold")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


MIN_REPS = 100  # fewer leave under 3 resamples in each 2.5% tail of a 95% interval: its ends would be noise


def main(argv=None) -> int:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", default=["runs"], help="run folders or folders of runs (default: runs)")
    ap.add_argument("--key", action="append", help="scalar key to summarise (repeatable; default eval/episodic_return)")
    ap.add_argument(
        "--at-step",
        type=int,
        nargs="+",
        default=[],
        metavar="STEP",
        check=at_least(0),
        help="also report the last value logged at or before each STEP",
    )
    ap.add_argument("--only", nargs="+", metavar="EXP_NAME", help="only these exp_names (setups)")
    ap.add_argument("--precision", type=int, default=2, check=at_least(0), help="decimals in the table (default 2)")
    ap.add_argument("--plot", metavar="OUT.png", help="also draw the curves (mean, 95%% bootstrap band) to this image")
    ap.add_argument(
        "--out",
        metavar="DIR",
        help="write report.md and the figures (curves.png, metrics.png, aggregates.png) into DIR: IQM and mean "
        "with stratified-bootstrap CIs (rliable), probability of improvement, AUC and steps to --threshold",
    )
    ap.add_argument("--baseline", metavar="SETUP", help="probability of improvement of every setup over this one")
    ap.add_argument(
        "--threshold",
        type=float,
        check=finite_problem,
        help="report the steps each run takes to reach this value (first key)",
    )
    ap.add_argument(
        "--steps",
        type=int,
        check=at_least(1),
        help="the step a complete run reaches (default: the longest run of its env)",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        check=seed_problem,
        help="the seeds every setup should have (default: all seen)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=2000,
        check=at_least(MIN_REPS, "fewer resamples leave a 95% interval's ends to chance"),
        help=f"bootstrap resamples (default 2000, at least {MIN_REPS})",
    )
    ap.add_argument(
        "--metric",
        action="append",
        help="plasticity key drawn into metrics.png (repeatable; default the *_mean keys the runs logged)",
    )
    a = ap.parse_args(argv)
    keys = list(dict.fromkeys(a.key or ["eval/episodic_return"]))
    try:
        # where the output goes, before any run is read
        if a.plot:
            p = Path(a.plot)
            if p.suffix.lower() not in (".png", ".pdf", ".svg"):
                raise ReportError(f"--plot {a.plot}: use a .png, .pdf or .svg file name")
            if p.is_dir():
                raise ReportError(f"--plot {a.plot}: is a folder, not a file name")
            if not p.resolve().parent.is_dir():
                raise ReportError(f"--plot {a.plot}: folder {p.resolve().parent} does not exist")
            if folder_problem(p.resolve().parent):
                raise ReportError(f"--plot {a.plot}: folder {p.resolve().parent} is not writable")
        if a.out and folder_problem(a.out):
            raise ReportError(f"--out {a.out}: {folder_problem(a.out)}")
        metrics = a.metric or [f"plasticity/{m}_mean" for m in ("erank_features", "dormant_ratio", "weight_magnitude")]
        groups, not_started = collect(a.paths, keys, a.only, optional=metrics)
        logged = tags_of(r for g in groups for r in g["runs"])
        for m in dict.fromkeys(a.metric or []):
            if m not in logged:
                raise ReportError(f"--metric {m}: no run logged it{did_you_mean(m, logged, 'keys the runs have')}")
        setups = {g["exp_name"] for g in groups}
        if a.baseline and a.baseline not in setups:
            raise ReportError(f"--baseline {a.baseline}: no such setup{did_you_mean(a.baseline, setups, 'have')}")
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = table(groups, keys, a.at_step, a.precision)
    complete, problems = split_complete(groups, keys[0], a.steps, a.seeds)
    problems = not_started + problems
    stats, matrices, ivals, better = stats_tables(groups, complete, problems, keys[0], a.reps, a.baseline, a.threshold)
    print(first + "\n\n" + stats)
    if a.plot:
        plot(groups, keys, Path(a.plot))
        print(f"\nplot: {a.plot}")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        plot(groups, keys, out / "curves.png")
        figures = ["curves.png"]
        have = [m for m in metrics if any(r["scalars"].get(m) for g in groups for r in g["runs"])]
        if have:
            plot([g for g in groups if any(r["scalars"][have[0]] for r in g["runs"])], have, out / "metrics.png")
            figures.append("metrics.png")
        if ivals:
            plot_aggregates(
                ivals, better, a.baseline, score_matrices(groups, complete, keys[0])[1], out / "aggregates.png"
            )
            figures.append("aggregates.png")
            plot_speed(complete, keys[0], a.threshold, out / "speed.png")
            figures.append("speed.png")
        command = "python benchmark/report.py " + " ".join(argv if argv is not None else sys.argv[1:])
        md = [f"# Report\n\n`{command}`\n", first, "", stats, ""] + [f"![{f}]({f})" for f in figures]
        tmp = out / "report.md.tmp"
        tmp.write_text("\n".join(md) + "\n")
        os.replace(tmp, out / "report.md")
        print(f"\nreport: {out / 'report.md'} ({', '.join(figures)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
