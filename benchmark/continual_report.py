"""Report of a continual run set (`--task-switch-every`, recipe dqn_cartpole_continual.toml): learning per task.

For each run (found and grouped by setup as benchmark/report.py does) and each task k (steps [k*T, (k+1)*T) for
`--task-steps T`), the task's score is the mean training return of the episodes that ended in it: how fast the agent
learned that task (an area under its learning curve). Over seeds, with 95% percentile-bootstrap intervals:

* the score of every setup on every task, and the change from the first task to the mean of the later ones
  (a loss of plasticity shows as a fall of the baseline's score task after task, each task being equally hard);
* each setup against `--baseline` on the later tasks: the mean difference and the probability of improvement;
* figures: score per task index (`tasks.png`); dormant ratio and effective rank of the features over time
  (`plasticity.png`).

    python benchmark/continual_report.py continual/runs --task-steps 8000 --out continual/report
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_checks import Parser, at_least, folder_problem  # noqa: E402
from report import ReportError, bootstrap_band, collect, save_figure  # noqa: E402

RETURN, METRICS = "charts/episodic_return", ("plasticity/dormant_ratio_mean", "plasticity/erank_features_mean")


def task_scores(series: dict, task_steps: int, n_tasks: int) -> np.ndarray:
    """Mean return of the episodes that ended in each task (NaN for a task without a finished episode)."""
    steps, values = np.array(sorted(series)), np.array([series[s] for s in sorted(series)])
    tasks = steps // task_steps
    return np.array([values[tasks == k].mean() if (tasks == k).any() else np.nan for k in range(n_tasks)])


def interval(xs: np.ndarray, reps: int, seed: int = 0) -> tuple:
    """Mean of `xs` (one value per seed) and its 95% percentile-bootstrap interval."""
    mean, low, high = bootstrap_band(np.asarray(xs, float)[:, None], reps, seed)
    return float(mean[0]), float(low[0]), float(high[0])


def prob_improvement(a: np.ndarray, b: np.ndarray, reps: int, seed: int = 0) -> tuple:
    """P(a run of A scores above a run of B) (ties count half) with a 95% bootstrap interval over seeds."""
    p = lambda x, y: float(((x[:, None] > y[None]) + 0.5 * (x[:, None] == y[None])).mean())  # noqa: E731
    rng = np.random.default_rng(seed)
    draws = [p(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(reps)]
    return p(a, b), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def plot_tasks(scores: dict, reps: int, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, s in scores.items():
        mean, low, high = bootstrap_band(s, reps)
        x = np.arange(s.shape[1])
        ax.plot(x, mean, marker="o", label=name)
        ax.fill_between(x, low, high, alpha=0.2)
    ax.set(xlabel="task index", ylabel="mean training return in the task", xticks=np.arange(s.shape[1]))
    ax.legend(fontsize=8)
    ax.set_title("Learning per task (mean over seeds, 95% bootstrap band)", fontsize=9)
    save_figure(fig, path)


def plot_metrics(groups: list, task_steps: int, reps: int, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 3.6))
    for ax, key in zip(axes, METRICS):
        for g in groups:
            steps = sorted(set.intersection(*(set(r["scalars"][key]) for r in g["runs"])))
            ys = np.array([[r["scalars"][key][s] for s in steps] for r in g["runs"]])
            mean, low, high = bootstrap_band(ys, reps)
            ax.plot(steps, mean, label=g["exp_name"])
            ax.fill_between(steps, low, high, alpha=0.2)
        for k in range(1, int(max(steps) // task_steps) + 1):
            ax.axvline(k * task_steps, color="grey", lw=0.5, ls="--")
        ax.set(xlabel="global step", title=key)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", default=["runs"], help="run folders or folders holding them (default runs)")
    ap.add_argument("--task-steps", type=int, required=True, check=at_least(1), help="the runs' --task-switch-every")
    ap.add_argument("--baseline", default="no_intervention", help="setup the others are compared with")
    ap.add_argument("--reps", type=int, default=2000, check=at_least(100), help="bootstrap resamples (>= 100)")
    ap.add_argument("--out", required=True, check=folder_problem, help="folder for report.md and the figures")
    args = ap.parse_args(argv)
    try:
        groups, _ = collect(args.paths, [RETURN], optional=METRICS)
        names = [g["exp_name"] for g in groups]
        if args.baseline not in names:
            raise ReportError(f"--baseline {args.baseline}: no such setup (have: {', '.join(names)})")
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = max(max(r["scalars"][RETURN]) for g in groups for r in g["runs"])
    n_tasks = int(last // args.task_steps) + 1
    scores = {g["exp_name"]: np.array([task_scores(r["scalars"][RETURN], args.task_steps, n_tasks)
                                       for r in g["runs"]]) for g in groups}  # fmt: skip
    header = "| setup | seeds | " + " | ".join(f"task {k}" for k in range(n_tasks)) + " | later − first |"
    lines = [header, "|" + "---|" * (n_tasks + 3)]
    for name, s in scores.items():
        cells = ["{:.1f} [{:.1f}, {:.1f}]".format(*interval(s[:, k], args.reps)) for k in range(n_tasks)]
        change = "{:+.1f} [{:+.1f}, {:+.1f}]".format(*interval(np.nanmean(s[:, 1:], 1) - s[:, 0], args.reps))
        lines.append(f"| {name} | {len(s)} | " + " | ".join(cells) + f" | {change} |")
    base = np.nanmean(scores[args.baseline][:, 1:], 1)
    lines += ["", f"Tasks 1-{n_tasks - 1} against {args.baseline}:", "", "| setup | mean difference | P(better) |"]
    lines.append("|---|---|---|")
    for name, s in scores.items():
        if name != args.baseline:
            later = np.nanmean(s[:, 1:], 1)
            diff = interval(later - base, args.reps) if len(later) == len(base) else (np.nan,) * 3
            better = prob_improvement(later, base, args.reps)
            lines.append(f"| {name} | {diff[0]:+.1f} [{diff[1]:+.1f}, {diff[2]:+.1f}] | "
                         f"{better[0]:.2f} [{better[1]:.2f}, {better[2]:.2f}] |")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_tasks(scores, args.reps, out / "tasks.png")
    if all(r["scalars"][k] for g in groups for r in g["runs"] for k in METRICS):
        plot_metrics(groups, args.task_steps, args.reps, out / "plasticity.png")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
