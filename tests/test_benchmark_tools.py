"""benchmark/sweep.py and benchmark/report.py: recipes, dry run, a real tiny sweep, failures, the report table
(checked against values read independently from the event files), the plot and the error messages."""

import json
import os
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tyro
from conftest import ROOT, load_script

SWEEP = ROOT / "benchmark" / "sweep.py"
REPORT = ROOT / "benchmark" / "report.py"
RECIPES = ROOT / "benchmark" / "recipes"
TINY = (
    "--env-id CartPole-v1 --total-timesteps 600 --learning-starts 200 --buffer-size 1000 --eval-every 300 "
    "--eval-episodes 1 --no-cuda --metrics-every 0"
)


def run(tool, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, str(tool), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def dry_commands(stdout):
    lines = [ln for ln in stdout.splitlines() if ln and not ln.startswith("#")]
    return [shlex.split(ln) for ln in lines]


def table_rows(stdout, which=0):
    """The `which`-th Markdown table of the output -> list of {column: cell}."""
    tables, current = [], []
    for ln in stdout.splitlines() + [""]:
        if ln.startswith("|"):
            current.append(ln)
        elif current:
            tables.append(current)
            current = []
    lines = tables[which]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def mean_pm_std(cell):
    m, s = cell.split(" ± ")
    return float(m), float(s.split()[0])


# ---------------------------------------------------------------- sweep: recipes and dry run


def test_dry_run_prints_the_commands_of_a_recipe(tmp_cwd):
    r = run(
        SWEEP,
        "--recipe",
        RECIPES / "dqn_cartpole_quick.toml",
        "--dry-run",
        "--jobs",
        2,
        "--common",
        "--total-timesteps 2000",
        cwd=tmp_cwd,
    )
    assert r.returncode == 0, r.stderr
    cmds = dry_commands(r.stdout)
    # seed-major order: (plain, 1), (inject_5k, 1), (plain, 2), (inject_5k, 2)
    assert [(c[c.index("--exp-name") + 1], c[c.index("--seed") + 1]) for c in cmds] == [
        ("plain", "1"),
        ("inject_5k", "1"),
        ("plain", "2"),
        ("inject_5k", "2"),
    ]
    for c in cmds:
        assert c[:2] == ["OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"]
        assert c[2] == sys.executable and c[3] == str(ROOT / "dqn_atari_injection.py")
        assert c[4:6] == ["--env-id", "CartPole-v1"] and "--no-cuda" in c
        # --common comes after the recipe's and the setup's flags, so tyro lets it win
        assert c[-6:-4] == ["--total-timesteps", "2000"] and c.index("--total-timesteps") < len(c) - 6
        assert c[-4:-2] == ["--exp-name", c[c.index("--exp-name") + 1]]
    assert "--inject-at" not in cmds[0] and cmds[1][cmds[1].index("--inject-at") + 1] == "5000"
    assert list(tmp_cwd.iterdir()) == []  # a dry run writes nothing


def test_every_recipe_gives_commands_its_script_accepts(tmp_cwd):
    for recipe in sorted(RECIPES.glob("*.toml")):
        rec = tomllib.loads(recipe.read_text())
        extra = ["--var", "pretrained=/data/ppo-SpaceInvaders.zip"] if "vars" in rec else []
        r = run(SWEEP, "--recipe", recipe, "--dry-run", *extra, cwd=tmp_cwd)
        assert r.returncode == 0, (recipe.name, r.stderr)
        cmds = dry_commands(r.stdout)
        assert len(cmds) == len(rec["setups"]) * len(rec["seeds"]) * len(rec.get("envs", [None]))
        m = load_script(Path(rec["script"]).stem)
        for c in cmds:
            args = tyro.cli(m.Args, args=c[4:])  # every flag of the recipe exists in the script
            assert args.exp_name in rec["setups"] and args.seed in rec["seeds"]
            assert args.env_id in rec.get("envs", [args.env_id])
            if "vars" in rec:
                assert args.pretrained == "/data/ppo-SpaceInvaders.zip"
            elif args.env_id.endswith("NoFrameskip-v4") and hasattr(args, "pretrained") and args.pretrained:
                assert args.pretrained == f"sb3/ppo-{args.env_id}"
    phoenix = dry_commands(run(SWEEP, "--recipe", RECIPES / "dqn_phoenix.toml", "--dry-run", cwd=tmp_cwd).stdout)
    inj = {c[c.index("--exp-name") + 1]: tyro.cli(load_script("dqn_atari_injection").Args, args=c[4:]) for c in phoenix}
    assert {k: a.inject_at for k, a in inj.items()} == {
        "no_injection": [],
        "inject_5M": [5_000_000],
        "double_inject_5M_7500k": [5_000_000, 7_500_000],
    }
    assert all(a.cuda and a.total_timesteps == 10_000_000 and a.env_id == "PhoenixNoFrameskip-v4" for a in inj.values())


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--recipe", "nope.toml"], "--recipe nope.toml: no such file"),
        (["--recipe", RECIPES / "ppo_spaceinvaders_pretrained.toml"], "give it with --var pretrained=VALUE"),
        (["--script", "dqn_atari_injection.py", "--setup", "a__b=--inject-at 5"], "setup name 'a__b'"),
        (["--script", "dqn_atari_injection.py", "--setup", "a=--seed 3"], "--setup a: must not contain --seed"),
        (["--script", "dqn_atari_injection.py", "--setup", "noequals"], 'expected NAME="FLAGS"'),
        (["--script", "nope.py", "--setup", "a="], "--script nope.py: no such file"),
        (["--script", "dqn_atari_injection.py"], "no setups given"),
        (["--script", "dqn_atari_injection.py", "--setup", "a=", "--jobs", "0"], "--jobs 0: must be >= 1"),
        (["--script", "dqn_atari_injection.py", "--setup", "a=", "--cwd", "nodir"], "--cwd nodir: no such directory"),
        (["--recipe", RECIPES / "dqn_cartpole_quick.toml", "--only", "zzz"], "--only zzz: no such setup"),
    ],
)
def test_sweep_bad_input_is_one_line_error(tmp_cwd, args, msg):
    r = run(SWEEP, *args, cwd=tmp_cwd)
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert list(tmp_cwd.iterdir()) == []  # validated before anything is written


def test_sweep_runs_jobs_in_parallel_with_logs_and_reports_failures(tmp_cwd):
    """A fake script (no torch: fast) records what each job saw; the 'bad' setup fails with a stderr line."""
    fake = tmp_cwd / "fake.py"
    fake.write_text(
        "import json, os, sys, time\n"
        "t0 = time.time(); time.sleep(1.0)\n"
        "a = sys.argv[1:]\n"
        "rec = dict(argv=a, cwd=os.getcwd(), omp=os.environ.get('OMP_NUM_THREADS'), t0=t0, t1=time.time())\n"
        "open(f'job_{a[a.index(\"--exp-name\") + 1]}_{a[a.index(\"--seed\") + 1]}.json', 'w').write(json.dumps(rec))\n"
        "print('hello from', a)\n"
        "if '--explode' in a:\n"
        "    print('warming up', file=sys.stderr); print('error: --explode: kaboom', file=sys.stderr); sys.exit(3)\n"
    )
    work = tmp_cwd / "work"
    work.mkdir()
    r = run(
        SWEEP,
        "--script",
        fake,
        "--setup",
        "good=--x 1",
        "--setup",
        "bad=--explode",
        "--seeds",
        1,
        2,
        "--jobs",
        2,
        "--cwd",
        work,
        "--out",
        tmp_cwd / "logs",
        cwd=tmp_cwd,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2/4 jobs succeeded" in r.stdout
    for seed in (1, 2):
        assert f"FAILED bad seed {seed} (exit 3): error: --explode: kaboom" in r.stdout
    assert "FAILED good" not in r.stdout
    recs = [json.loads(f.read_text()) for f in sorted(work.glob("job_*.json"))]
    assert len(recs) == 4 and all(x["cwd"] == str(work) and x["omp"] == "1" for x in recs)
    good1 = json.loads((work / "job_good_1.json").read_text())["argv"]
    assert good1 == ["--x", "1", "--exp-name", "good", "--seed", "1"]
    # never more than 2 at a time, and 2 did overlap
    events = sorted([(x["t0"], 1) for x in recs] + [(x["t1"], -1) for x in recs])
    conc = np.cumsum([e[1] for e in events])
    assert conc.max() == 2
    logs = tmp_cwd / "logs"
    assert "hello from" in (logs / "good__1.out").read_text()
    assert (logs / "bad__2.err").read_text().splitlines()[-1] == "error: --explode: kaboom"
    summ = json.loads((logs / "summary.json").read_text())
    assert sorted((j["setup"], j["seed"], j["returncode"]) for j in summ["jobs"]) == [
        ("bad", 1, 3),
        ("bad", 2, 3),
        ("good", 1, 0),
        ("good", 2, 0),
    ]


# ---------------------------------------------------------------- a real tiny sweep + report


def read_independently(run_dir, key):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(key)} if key in ea.Tags()["scalars"] else {}


def test_real_sweep_then_report_matches_event_files(tmp_cwd):
    r = run(
        SWEEP,
        "--script",
        "dqn_atari_injection.py",
        "--setup",
        "plain=",
        "--setup",
        "inj=--inject-at 400",
        "--setup",
        "broken=--inject-at 100",
        "--seeds",
        1,
        2,
        "--jobs",
        2,
        "--common",
        TINY,
        "--quiet",
        cwd=tmp_cwd,
    )
    # the broken setup injects before --learning-starts: both of its jobs fail with the script's error line
    assert r.returncode == 1, r.stdout + r.stderr
    assert "4/6 jobs succeeded" in r.stdout
    for seed in (1, 2):
        assert (
            f"FAILED broken seed {seed} (exit 1): error: --inject-at [100] is before --learning-starts 200" in r.stdout
        )
    runs = sorted(p for p in (tmp_cwd / "runs").iterdir() if not p.name.startswith("_"))
    assert [p.name.split("__")[1:3] for p in runs] == [["inj", "1"], ["inj", "2"], ["plain", "1"], ["plain", "2"]]
    assert len(list((tmp_cwd / "runs" / "_sweeps").glob("dqn_atari_injection_*/summary.json"))) == 1

    rep = run(REPORT, "runs", "--at-step", 300, 450, "--precision", 6, "--plot", "curves.png", cwd=tmp_cwd)
    assert rep.returncode == 0, rep.stderr
    rows = {row["setup"]: row for row in table_rows(rep.stdout)}
    assert set(rows) == {"plain", "inj"}
    for name, row in rows.items():
        dirs = [p for p in runs if p.name.split("__")[1] == name]
        series = [read_independently(d, "eval/episodic_return") for d in dirs]
        assert all(sorted(s) == [300, 600] for s in series)
        finals = np.array([s[600] for s in series])
        at300 = np.array([s[300] for s in series])
        for col, vals in (
            ("eval/episodic_return final", finals),
            ("eval/episodic_return @300", at300),
            ("eval/episodic_return @450", at300),
        ):  # @450: last value at or before 450
            m, sd = mean_pm_std(row[col])
            assert m == pytest.approx(vals.mean(), abs=1e-6) and sd == pytest.approx(vals.std(), abs=1e-6), col
        assert row["n"] == "2" and row["seeds"] == "1 2" and row["last step"] == "600"
        inj_steps = sorted({s for d in dirs for s in read_independently(d, "injection/count")})
        assert inj_steps == ([400] if name == "inj" else [])
    assert rows["inj"]["injections"] == "400" and rows["plain"]["injections"] == "–"
    assert (tmp_cwd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a key the DQN runs do not have: the error names the runs and lists the keys they have
    bad = run(REPORT, "runs", "--key", "eval/success_rate", cwd=tmp_cwd)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: --key eval/success_rate: missing in 4 of 4 runs: ")
    assert "eval/episodic_return" in bad.stderr and bad.stderr.count("\n") == 1


# ---------------------------------------------------------------- report on synthetic runs


def write_run(root, name, scalars):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(root / name))
    for key, pts in scalars.items():
        for step, v in pts:
            w.add_scalar(key, v, step)
    w.close()


def test_report_partial_key_duplicates_and_env_ids_with_slash(tmp_cwd):
    runs = tmp_cwd / "runs"
    write_run(runs, "PointmassHard-v0__a__1__100", {"eval/success_rate": [(10, 0.5), (20, 1.0)]})
    write_run(
        runs, "PointmassHard-v0__a__2__100", {"eval/success_rate": [(10, 0.0), (20, 0.5)], "injection/count": [(15, 1)]}
    )
    write_run(runs, "PointmassHard-v0__a__2__50", {"eval/success_rate": [(10, 9.0), (20, 9.0)]})  # older duplicate
    write_run(runs, "ALE/Phoenix-v5__a__1__100", {"eval/success_rate": [(5, 2.0), (30, 3.0)]})
    r = run(REPORT, "runs", "--key", "eval/success_rate", "--at-step", 12, 1, cwd=tmp_cwd)
    assert r.returncode == 0, r.stderr
    assert "using runs/PointmassHard-v0__a__2__100" in r.stderr  # the latest duplicate wins, said on stderr
    rows = {(row["env"], row["setup"]): row for row in table_rows(r.stdout)}
    pm = rows[("PointmassHard-v0", "a")]
    assert pm["eval/success_rate final"] == "0.75 ± 0.25" and pm["eval/success_rate @12"] == "0.25 ± 0.25"
    assert pm["eval/success_rate @1"] == "n/a" and pm["n"] == "2"
    assert pm["injections"] == "15 (1/2 runs)"
    ph = rows[("ALE/Phoenix-v5", "a")]
    assert ph["eval/success_rate final"] == "3.00 ± 0.00" and ph["eval/success_rate @12"] == "2.00 ± 0.00"

    write_run(runs, "PointmassHard-v0__b__1__100", {"eval/episodic_return": [(10, -50.0)]})
    r = run(REPORT, "runs", "--key", "eval/success_rate", cwd=tmp_cwd)  # a run without the key: listed, left out
    assert r.returncode == 0 and "- partial: PointmassHard-v0 b seed 1 has no eval/success_rate" in r.stdout
    r = run(REPORT, "runs", "--key", "eval/succes_rate", cwd=tmp_cwd)  # a key no run has: a typo
    assert r.returncode == 2 and "--key eval/succes_rate: missing in 4 of 4 runs" in r.stderr
    r = run(REPORT, "runs", "--key", "eval/success_rate", "--only", "a", cwd=tmp_cwd)
    assert r.returncode == 0 and len(table_rows(r.stdout)) == 2


@pytest.mark.parametrize(
    "args, msg",
    [
        (["runs"], "error: runs: no such file or directory"),
        (["empty"], "error: no runs found under empty"),
        (["empty", "--plot", "out.jpg"], "error: --plot out.jpg: use a .png, .pdf or .svg file name"),
        (["empty", "--plot", "nodir/out.png"], "error: --plot nodir/out.png: folder"),
    ],
)
def test_report_errors_are_clear(tmp_cwd, args, msg):
    (tmp_cwd / "empty" / "not_a_run").mkdir(parents=True)
    r = run(REPORT, *args, cwd=tmp_cwd)
    assert r.returncode == 2 and r.stderr.startswith(msg) and r.stderr.count("\n") == 1 and r.stdout == ""


# ---------------------------------------------------------------- envs x seeds x setups, submitit, requeue


def test_envs_seeds_and_setups_expand_into_one_command_each(tmp_cwd):
    recipe = tmp_cwd / "r.toml"
    recipe.write_text(
        'script = "dqn_atari_injection.py"\nseeds = [1, 2]\nenvs = ["CartPole-v1", "Acrobot-v1"]\n'
        'common = "--no-cuda"\n[setups]\nplain = ""\ntagged = "--wandb-project-name p-${env}"\n'
    )
    r = run(SWEEP, "--recipe", recipe, "--dry-run", cwd=tmp_cwd)
    assert r.returncode == 0, r.stderr
    cmds = dry_commands(r.stdout)
    got = [(c[c.index("--env-id") + 1], c[c.index("--exp-name") + 1], c[c.index("--seed") + 1]) for c in cmds]
    assert got == [
        (e, s, str(seed)) for seed in (1, 2) for e in ("CartPole-v1", "Acrobot-v1") for s in ("plain", "tagged")
    ]
    assert [c[c.index("--wandb-project-name") + 1] for c in cmds if "tagged" in c] == [
        "p-CartPole-v1",
        "p-Acrobot-v1",
    ] * 2
    r = run(SWEEP, "--recipe", recipe, "--envs", "LunarLander-v3", "--dry-run", cwd=tmp_cwd)
    assert {c[c.index("--env-id") + 1] for c in dry_commands(r.stdout)} == {"LunarLander-v3"}


def test_submitit_local_executor_runs_the_grid_with_wandb_groups(tmp_cwd):
    r = run(
        SWEEP,
        "--script",
        "dqn_atari_injection.py",
        "--setup",
        "plain=",
        "--setup",
        "inj=--inject-at 400",
        "--seeds",
        3,
        "--common",
        TINY,
        "--launcher",
        "submitit-local",
        "--time",
        10,
        cwd=tmp_cwd,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2/2 jobs succeeded" in r.stdout
    runs = sorted(p.name.split("__")[:3] for p in (tmp_cwd / "runs").iterdir() if not p.name.startswith("_"))
    assert runs == [["CartPole-v1", "inj", "3"], ["CartPole-v1", "plain", "3"]]
    (summary,) = (tmp_cwd / "runs" / "_sweeps").glob("*/summary.json")
    assert [j["returncode"] for j in json.loads(summary.read_text())["jobs"]] == [0, 0]
    sweep = load_script_path(SWEEP)
    env = sweep.job_env({"setup": "inj", "env": "CartPole-v1"}, "my_recipe")
    assert env["WANDB_RUN_GROUP"] == "my_recipe" and env["WANDB_TAGS"] == "inj,CartPole-v1"


def load_script_path(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem + "_mod", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_requeued_job_ignores_usr2_gets_sigterm_then_resumes_with_resume_auto(tmp_cwd, monkeypatch):
    import threading
    import time

    sweep = load_script_path(SWEEP)
    child = "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
    child += "print(os.environ['NODE_ONLY'], os.environ['WANDB_RUN_GROUP'], flush=True)\ntime.sleep(60)"
    cmd = [sys.executable, "-c", child, "--seed", "1"]
    job = sweep.ScriptJob()
    out, err = str(tmp_cwd / "o"), str(tmp_cwd / "e")
    env = sweep.job_env({"setup": "inj"}, "grp")  # made where the sweep runs; the node adds its own variables
    monkeypatch.setenv("NODE_ONLY", "gpu3")
    worker = threading.Thread(target=lambda: job(cmd, str(tmp_cwd), env, out, err))
    worker.start()
    while job.proc is None or not open(out).read():
        assert job.proc is None or job.proc.poll() is None, open(err).read()
        time.sleep(0.01)
    assert open(out).read().split() == ["gpu3", "grp"]
    job.proc.send_signal(signal.SIGUSR2)  # SLURM's warning before the time limit reaches every process of a job
    time.sleep(0.5)
    assert job.proc.poll() is None
    delayed = job.checkpoint(cmd, str(tmp_cwd), env, out, err)
    worker.join(timeout=30)
    assert job.proc.returncode == 143  # the script got SIGTERM (and would have written a checkpoint)
    assert delayed.args[0] == [*cmd, "--resume", "auto"]
    assert sweep.with_resume(delayed.args[0]) == delayed.args[0]  # requeued again: --resume is not repeated


# ---------------------------------------------------------------- report: rliable statistics, missing runs


def independent_iqm(x):
    x = np.sort(np.asarray(x, dtype=float))
    k = len(x) // 4  # n divisible by 4 in these tests: drop the lowest and highest quarter
    return x[k : len(x) - k].mean()


def test_report_iqm_interval_improvement_and_threshold_match_an_independent_computation(tmp_cwd):
    runs = tmp_cwd / "runs"
    finals = {"base": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0], "new": [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]}
    for setup, values in finals.items():
        for seed, v in enumerate(values, 1):
            write_run(runs, f"CartPole-v1__{setup}__{seed}__100", {"eval/episodic_return": [(10, 0.0), (20, v)]})
    r = run(REPORT, "runs", "--baseline", "base", "--threshold", 6, "--reps", 4000, "--out", "rep", cwd=tmp_cwd)
    assert r.returncode == 0, r.stderr
    rows = {row["setup"]: row for row in table_rows(r.stdout, 1)}
    rng = np.random.default_rng(1)
    for setup, values in finals.items():
        iqm = float(rows[setup]["IQM [95% CI]"].split()[0])
        low, high = (float(x) for x in rows[setup]["IQM [95% CI]"].split("[")[1].rstrip("]").split(","))
        assert iqm == pytest.approx(independent_iqm(values), rel=1e-3)
        boot = [independent_iqm(rng.choice(values, len(values))) for _ in range(4000)]
        assert low == pytest.approx(np.percentile(boot, 2.5), abs=0.6) and high == pytest.approx(
            np.percentile(boot, 97.5), abs=0.6
        )
        assert float(rows[setup]["mean [95% CI]"].split()[0]) == pytest.approx(np.mean(values), rel=1e-3)
        reached = sum(v >= 6 for v in values)
        assert rows[setup]["steps to reach 6"] == f"median 20 ({reached}/8 reached)"
    # P(new > base) over all pairs, ties count half
    p = np.mean([(a > b) + 0.5 * (a == b) for a in finals["new"] for b in finals["base"]])
    assert f"- `new`: {p:.2f} [" in r.stdout
    for f in ("report.md", "curves.png", "aggregates.png", "speed.png"):  # speed: AUC and time to threshold
        assert (tmp_cwd / "rep" / f).is_file(), f
        assert f == "report.md" or f"![{f}]({f})" in (tmp_cwd / "rep" / "report.md").read_text()


def test_report_lists_missing_and_partial_runs_and_leaves_them_out(tmp_cwd):
    runs = tmp_cwd / "runs"
    for seed in (1, 2, 3):
        write_run(runs, f"CartPole-v1__a__{seed}__100", {"eval/episodic_return": [(10, 1.0), (20, float(seed))]})
    write_run(runs, "CartPole-v1__b__1__100", {"eval/episodic_return": [(10, 1.0), (20, 5.0)]})
    write_run(runs, "CartPole-v1__b__2__100", {"eval/episodic_return": [(10, 50.0)]})  # stopped at step 10
    write_run(runs, "CartPole-v1__c__1__100", {"losses/td_loss": [(5, 1.0)]})  # still running: no evaluation yet
    r = run(REPORT, "runs", cwd=tmp_cwd)
    assert r.returncode == 0, r.stderr
    assert "- partial: CartPole-v1 b seed 2 stops at step 10 of 20" in r.stdout
    assert "- partial: CartPole-v1 c seed 1 has no eval/episodic_return (runs/CartPole-v1__c__1__100)" in r.stdout
    assert "- missing: CartPole-v1 b seed 3" in r.stdout
    rows = {row["setup"]: row for row in table_rows(r.stdout, 1)}
    assert rows["b"]["runs x envs"] == "1 x 1" and rows["b"]["mean [95% CI]"].startswith("5 [")
    assert rows["a"]["runs x envs"] == "3 x 1"


def test_report_human_normalises_atari_returns(tmp_cwd):
    runs = tmp_cwd / "runs"
    for seed, v in ((1, 1.7), (2, 30.5)):  # Breakout's random and human reference scores
        write_run(runs, f"BreakoutNoFrameskip-v4__a__{seed}__100", {"charts/episodic_return": [(5, v)]})
    r = run(REPORT, "runs", "--key", "charts/episodic_return", cwd=tmp_cwd)
    assert r.returncode == 0, r.stderr
    assert "charts/episodic_return (human-normalised)" in r.stdout
    assert table_rows(r.stdout, 1)[0]["mean [95% CI]"].startswith("0.5 [")
