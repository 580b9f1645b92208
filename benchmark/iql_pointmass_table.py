"""Results table for iql_pointmass_injection.py on PointmassHard-v0.

Runs 4 setups x seeds at the script's default budget (offline only; offline->online without
injection; with a single injection; with a double injection), at most --workers processes at a time,
one CPU thread each. Every finished run is stored as JSON under benchmark/results/iql_pointmass/
(gitignored) and skipped when the table is run again, so an interrupted benchmark resumes.
Prints a Markdown table of the final evaluation return and success rate (mean +- std over seeds), plus the
BFS shortest-path controller on the same evaluation episodes as a reference.

    python benchmark/iql_pointmass_table.py                  # 4 setups x 3 seeds, 2 workers
    python benchmark/iql_pointmass_table.py --seeds 1 2 3 4 5 --workers 1
    python benchmark/iql_pointmass_table.py --table-only     # print the table from stored results
"""

import argparse
import hashlib
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results" / "iql_pointmass"


SNAPSHOT = OUT / "iql_pointmass_injection_snapshot.py"


def _load_script(path=None):
    """Workers import the snapshot taken when the benchmark started, so edits made to the script
    while the benchmark runs cannot mix two versions into one table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("iql_pointmass_injection", path or SNAPSHOT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["iql_pointmass_injection"] = mod
    spec.loader.exec_module(mod)
    return mod


def setups(m):
    """name -> extra Args fields. Injection steps follow the script's default budget."""
    d = m.Args()
    n, k = d.offline_steps, d.online_steps
    return {
        "offline only": dict(online_steps=0),
        "offline→online, no injection": dict(),
        f"single injection (step {n})": dict(inject_at=[n]),
        f"double injection (steps {n}, {n + k // 2})": dict(inject_at=[n, n + k // 2]),
    }


def _run(name: str, extra: dict, seed: int, workdir: str) -> dict:
    import torch

    torch.set_num_threads(1)
    m = _load_script()
    os.chdir(workdir)
    t0 = time.time()
    # one exp_name per setup: two runs of one seed that start in the same second get separate folders
    exp = "iql_table_" + "".join(c if c.isalnum() else "_" for c in name.split(" (")[0])
    res = m.train(m.Args(seed=seed, cuda=False, exp_name=exp, dataset_dir=str(ROOT / "datasets"), **extra))
    res.update(
        setup=name,
        seed=seed,
        wall_s=time.time() - t0,
        extra=extra,
        code_sha1=hashlib.sha1(SNAPSHOT.read_bytes()).hexdigest()[:12],
    )
    return res


class ShortestPathController:
    """The reference policy on a PointmassEnv of the script module `m`: BFS distances over free cells to the goal
    cell, then the action whose noise-free move lands in the cell closest to the goal (ties: Euclidean distance)."""

    def __init__(self, m, env):
        import numpy as np

        self.actions, self.env, h, w = m.ACTIONS, env, env.height, env.width
        self.dist = np.full((h, w), np.inf)
        goal = (int(env.goal[0]), int(env.goal[1]))
        self.dist[goal] = 0
        queue = deque([goal])
        while queue:
            i, j = queue.popleft()
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < h and 0 <= b < w and not env.walls[a, b] and self.dist[a, b] == np.inf:
                    self.dist[a, b] = self.dist[i, j] + 1
                    queue.append((a, b))

    def __call__(self, obs) -> int:
        import numpy as np

        env = self.env
        pos = np.asarray(obs, dtype=np.float64) * env._scale
        moves = [env.move(pos, a) for a in self.actions]
        keys = [(self.dist[env.cell(p)], float(np.linalg.norm(p - env.goal))) for p in moves]
        return keys.index(min(keys))


def reference_row(m, seeds) -> str:
    """The BFS shortest-path controller on the very evaluation episodes (same noise) of each seed."""
    import numpy as np

    d = m.Args()
    env = m.PointmassEnv(d.env_id)
    ctl = ShortestPathController(m, env)
    rets, succ = [], []
    for seed in sorted(seeds):
        r_seed, s_seed = [], []
        for ep in range(d.eval_episodes):  # train() evaluates with seeds seed + 10_000 + ep
            obs, _ = env.reset(seed=seed + 10_000 + ep)
            ret, done = 0.0, False
            while not done:
                obs, r, term, trunc, info = env.step(ctl(obs))
                ret += r
                done = term or trunc
            r_seed.append(ret)
            s_seed.append(float(info["success"]))
        rets.append(np.mean(r_seed))
        succ.append(np.mean(s_seed))
    rets, succ = np.array(rets), np.array(succ)
    return (
        f"| reference: BFS shortest-path controller, same evaluation episodes | {rets.mean():.1f} ± {rets.std():.1f} | "
        f"{succ.mean():.2f} ± {succ.std():.2f} | {len(seeds)} | – |"
    )


def table(results, seeds, m=None) -> str:
    import numpy as np

    lines = [
        "| setup | eval return (mean ± std) | success rate (mean ± std) | seeds | wall time per run |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["setup"] for r in results):
        rs = [r for r in results if r["setup"] == name and r["seed"] in seeds]
        ret = np.array([r["eval/episodic_return"] for r in rs])
        suc = np.array([r["eval/success_rate"] for r in rs])
        wall = np.mean([r["wall_s"] for r in rs]) / 60
        lines.append(
            f"| {name} | {ret.mean():.1f} ± {ret.std():.1f} | {suc.mean():.2f} ± {suc.std():.2f} | "
            f"{len(rs)} | {wall:.1f} min |"
        )
    if m is not None:
        lines.append(reference_row(m, seeds))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--workers", type=int, default=2, help="parallel runs (one CPU thread each)")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    script = (ROOT / "iql_pointmass_injection.py").read_text()
    if not a.table_only:
        SNAPSHOT.write_text(script)
    m = _load_script(ROOT / "iql_pointmass_injection.py")
    code_sha = hashlib.sha1(script.encode()).hexdigest()[:12]
    todo, results = [], []
    # seed-major order, longest runs first within a seed
    for seed in a.seeds:
        for i, (name, extra) in enumerate(setups(m).items()):
            f = OUT / f"{i}_seed{seed}.json"
            if f.exists():
                results.append(json.loads(f.read_text()))
            else:
                todo.append((i, name, extra, seed, f))
    t0 = time.time()
    if todo and not a.table_only:
        for seed in sorted({t[3] for t in todo}):  # make each seed's dataset once, before the pool
            m.load_or_make_dataset(m.Args(seed=seed, dataset_dir=str(ROOT / "datasets")))
        todo.sort(key=lambda t: (t[3], t[0] == 0))
        with ProcessPoolExecutor(max_workers=a.workers) as pool:
            futs = {pool.submit(_run, name, extra, seed, str(OUT)): (i, f) for i, name, extra, seed, f in todo}
            for fut in as_completed(futs):
                i, f = futs[fut]
                r = fut.result()
                r = {k: v for k, v in r.items() if isinstance(v, (int, float, str, list, dict))}
                f.write_text(json.dumps(r, indent=1))
                results.append(r)
                print(
                    f"[{(time.time() - t0) / 60:.1f} min] {r['setup']} seed {r['seed']}: "
                    f"return {r['eval/episodic_return']:.1f}, success {r['eval/success_rate']:.2f} "
                    f"({r['wall_s'] / 60:.1f} min)",
                    flush=True,
                )
    order = list(setups(m))
    results.sort(key=lambda r: (order.index(r["setup"]) if r["setup"] in order else 99, r["seed"]))
    print(table(results, set(a.seeds), m))
    if todo and not a.table_only:
        print(
            f"\ncode sha1 {code_sha}; wall time of this invocation: {(time.time() - t0) / 60:.1f} min, "
            f"{a.workers} workers"
        )


if __name__ == "__main__":
    main()
