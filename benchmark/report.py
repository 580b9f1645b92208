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
from collections import defaultdict
from pathlib import Path

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
    the folder in file-name (creation) order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = {k: {} for k in keys}
    all_tags = set()
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        try:
            for ev in EventFileLoader(str(f)).Load():
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


def collect(paths, keys, only=None) -> list:
    """Groups: list of dicts (env_id, exp_name, runs=[run with 'scalars'])."""
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
        r["scalars"], r["tags"] = read_scalars(r["path"], list(keys) + [INJECTION_KEY])
        for k in keys:
            if not r["scalars"][k]:
                missing[k].append(r)
    for k, rs in missing.items():
        have = sorted(t for t in rs[0]["tags"] if not t.startswith("plasticity/"))
        names = ", ".join(str(r["path"]) for r in rs[:5]) + (f" and {len(rs) - 5} more" if len(rs) > 5 else "")
        raise ReportError(
            f"--key {k}: missing in {len(rs)} of {len(runs)} runs: {names} "
            f"(keys in {rs[0]['path'].name}: {', '.join(have) or 'none'})"
        )
    groups = defaultdict(list)
    for r in runs:
        groups[(r["env_id"], r["exp_name"])].append(r)
    # order: by env, then by the start time of the group's first run (a sweep's setup order), then name
    order = sorted(groups, key=lambda g: (g[0], min(r["time"] for r in groups[g]), g[1]))
    return [dict(env_id=g[0], exp_name=g[1], runs=sorted(groups[g], key=lambda r: r["seed"])) for g in order]


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
    import numpy as np

    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 3.6 * len(keys)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    multi_env = len({g["env_id"] for g in groups}) > 1
    for ax, k in zip(axes[:, 0], keys):
        for i, g in enumerate(groups):
            c = colors[i % len(colors)]
            grid = np.array(sorted({s for r in g["runs"] for s in r["scalars"][k]}), dtype=float)
            ys = []
            for r in g["runs"]:
                st = np.array(sorted(r["scalars"][k]), dtype=float)
                y = np.interp(grid, st, [r["scalars"][k][int(s)] for s in st])
                y[(grid < st[0]) | (grid > st[-1])] = np.nan
                ys.append(y)
            ys = np.array(ys)
            m, s = np.nanmean(ys, axis=0), np.nanstd(ys, axis=0)
            label = (f"{g['env_id']} " if multi_env else "") + f"{g['exp_name']} (n={len(g['runs'])})"
            ax.plot(grid, m, color=c, label=label)
            ax.fill_between(grid, m - s, m + s, color=c, alpha=0.2, linewidth=0)
            for st in sorted({s for r in g["runs"] for s in r["scalars"][INJECTION_KEY]}):
                ax.axvline(st, color=c, linestyle="--", linewidth=1, alpha=0.8)
        ax.set_xlabel("global step")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title("mean ± std over seeds; dashed: injection steps")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)  # never leave a half-written plot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", default=["runs"], help="run folders or folders of runs (default: runs)")
    ap.add_argument("--key", action="append", help="scalar key to summarise (repeatable; default eval/episodic_return)")
    ap.add_argument(
        "--at-step",
        type=int,
        nargs="+",
        default=[],
        metavar="STEP",
        help="also report the last value logged at or before each STEP",
    )
    ap.add_argument("--only", nargs="+", metavar="EXP_NAME", help="only these exp_names (setups)")
    ap.add_argument("--precision", type=int, default=2, help="decimals in the table (default 2)")
    ap.add_argument("--plot", metavar="OUT.png", help="also draw mean ± std curves per group to this image (Agg)")
    a = ap.parse_args(argv)
    keys = list(dict.fromkeys(a.key or ["eval/episodic_return"]))
    try:
        if a.precision < 0:
            raise ReportError(f"--precision {a.precision}: must be >= 0")
        if any(s < 0 for s in a.at_step):
            raise ReportError(f"--at-step {min(a.at_step)}: steps must be >= 0")
        if a.plot:
            p = Path(a.plot)
            if p.suffix.lower() not in (".png", ".pdf", ".svg"):
                raise ReportError(f"--plot {a.plot}: use a .png, .pdf or .svg file name")
            if not p.resolve().parent.is_dir():
                raise ReportError(f"--plot {a.plot}: folder {p.resolve().parent} does not exist")
        groups = collect(a.paths, keys, a.only)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(groups, keys, a.at_step, a.precision))
    if a.plot:
        plot(groups, keys, Path(a.plot))
        print(f"\nplot: {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
