"""Run one of the injection scripts over a grid of setups x seeds, as subprocesses.

Each job is `python SCRIPT [recipe common] [setup flags] [--common] --exp-name SETUP --seed SEED`,
run in `--cwd` (so its TensorBoard run lands in `<cwd>/runs/{env_id}__{SETUP}__{SEED}__{time}`) with
OMP_NUM_THREADS=1 / MKL_NUM_THREADS=1, at most `--jobs` at a time (seed-major order: all setups of the
first seed start first). tyro keeps the LAST value of a repeated flag, so setup flags override the
recipe's `common`, and `--common` on the command line overrides both (handy to shorten a recipe for a
smoke test). Each job's stdout/stderr go to `<out>/<SETUP>__<SEED>.out` / `.err`; `<out>/summary.json`
lists every job's command, exit code and wall time. At the end a summary names every failed job with its
exit code and the line of its stderr that says what went wrong (its last `error: ...` line, the exception line of a
traceback, or the message inside the box tyro draws around its errors); the sweep exits with 1 if any job failed.
Bad input (a flag, a recipe key, a seed outside 0 <= seed < 2**32, an output folder that is a file or not writable)
stops the sweep with one `error: ...` line before anything is run or written.

Setups come from a TOML recipe (`--recipe FILE`), from repeated `--setup NAME="FLAGS"` options, or both
(a `--setup` with a recipe's setup name replaces it). Recipe format (see benchmark/recipes/):

    script = "dqn_atari_injection.py"      # relative to the repository root, or an absolute path
    seeds = [1, 2, 3]                      # --seeds overrides
    envs = ["CartPole-v1"]                 # optional, --envs overrides: each job gets --env-id ENV, and ${env}
                                           # in any flags is replaced by it (jobs: envs x seeds x setups)
    common = "--no-cuda"
    [vars]                                 # optional: ${name} placeholders the user must give with --var
    pretrained = "local path of the SB3 zip"
    [setups]                               # name = "flags"; the name becomes --exp-name
    no_injection = ""
    inject_5k = "--inject-at 5000"

Setup names must be letters, digits, '.', '-', '_' (no '__': it separates the fields of a run name).

    python benchmark/sweep.py --recipe benchmark/recipes/dqn_cartpole_quick.toml --jobs 2
    python benchmark/sweep.py --recipe benchmark/recipes/dqn_phoenix.toml --dry-run
    python benchmark/sweep.py --script dqn_atari_injection.py --seeds 1 2 --common "--env-id CartPole-v1" \\
        --setup plain="" --setup inj="--inject-at 5000" --cwd /scratch/exp1
    python benchmark/sweep.py --recipe benchmark/recipes/ppo_spaceinvaders_pretrained.toml \\
        --var pretrained=/data/ppo-SpaceInvadersNoFrameskip-v4.zip

Launchers (`--launcher`): `local` (default) runs the jobs as subprocesses here. `slurm` submits them as one
SLURM array job through submitit (`--partition`, `--gpus`, `--cpus`, `--mem-gb`, `--time` minutes, at most `--jobs`
at a time); `submitit-local` runs the same submitit code path on this machine (for tests and dry runs of a
cluster set-up). Under submitit a job that is preempted or reaches its time limit forwards SIGTERM to the script
(which writes a checkpoint) and is requeued with `--resume auto` appended, so it continues from that checkpoint:
give the recipe a `--checkpoint-every` for long runs. Each job sets WANDB_RUN_GROUP (the recipe or script name)
and WANDB_TAGS (setup, env), so `--track` runs are grouped and tagged by setup on the wandb dashboard.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_checks.py, also when this file is imported by path
from cli_checks import Parser, above, at_least, folder_problem, seed_problem  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
RESERVED = ("--exp-name", "--seed")


class SweepError(Exception):
    """Bad input: printed as one `error: ...` line, exit code 2."""


def load_recipe(path: Path) -> dict:
    if not path.is_file():
        raise SweepError(f"--recipe {path}: no such file")
    try:
        rec = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"--recipe {path}: not valid TOML ({e})")
    unknown = set(rec) - {"script", "seeds", "envs", "common", "setups", "vars", "description"}
    if unknown:
        raise SweepError(
            f"--recipe {path}: unknown keys {sorted(unknown)} (allowed: description, script, seeds, envs, "
            "common, vars, setups)"
        )
    if not isinstance(rec.get("script", ""), str):
        raise SweepError(f"--recipe {path}: script must be a string (the script's path)")
    if not isinstance(rec.get("envs", []), list) or not all(isinstance(e, str) for e in rec.get("envs", [])):
        raise SweepError(f"--recipe {path}: envs must be a list of env ids")
    if rec.get("envs") == []:
        raise SweepError(f"--recipe {path}: envs = [] lists no env id (leave the key out to keep the script's own)")
    if not isinstance(rec.get("setups", {}), dict) or not all(
        isinstance(v, str) for v in rec.get("setups", {}).values()
    ):
        raise SweepError(f"--recipe {path}: [setups] must map names to flag strings")
    if not isinstance(rec.get("common", ""), str):
        raise SweepError(f"--recipe {path}: common must be a string of flags")
    seeds = rec.get("seeds", [1])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"--recipe {path}: seeds must be a list of integers")
    if not seeds:
        raise SweepError(f"--recipe {path}: seeds = [] lists no seed (give at least one, or leave the key out for 1)")
    for s in seeds:
        if seed_problem(s):
            raise SweepError(f"--recipe {path}: seeds: {s}: {seed_problem(s)}")
    if not isinstance(rec.get("vars", {}), dict):
        raise SweepError(f"--recipe {path}: [vars] must map names to descriptions")
    return rec


def parse_setup(opt: str) -> tuple:
    if "=" not in opt:
        raise SweepError(f'--setup {opt!r}: expected NAME="FLAGS"')
    name, flags = opt.split("=", 1)
    return name.strip(), flags


def split_flags(where: str, flags: str) -> list:
    try:
        return shlex.split(flags)
    except ValueError as e:
        raise SweepError(f"{where}: cannot split flags {flags!r} ({e})")


def substitute(where: str, text: str, values: dict, described: dict) -> str:
    def rep(m):
        k = m.group(1)
        if k == "env":  # replaced per job
            return m.group(0)
        if k not in values:
            hint = f" ({described[k]})" if k in described else ""
            raise SweepError(f"{where} uses ${{{k}}}: give it with --var {k}=VALUE{hint}")
        return values[k]

    return VAR_RE.sub(rep, text)


def build_jobs(a) -> tuple:
    """Validate everything and return (script path, list of jobs); nothing is written here."""
    rec = load_recipe(Path(a.recipe)) if a.recipe else {}
    where_rec = f"--recipe {a.recipe}"
    values = {}
    for v in a.var:
        if "=" not in v:
            raise SweepError(f"--var {v!r}: expected NAME=VALUE")
        k, val = v.split("=", 1)
        values[k.strip()] = val
    described = rec.get("vars", {})
    unused = set(values) - set(described) if a.recipe else set(values)
    if unused:
        raise SweepError(
            f"--var {sorted(unused)[0]}: the recipe declares no such variable (declared: {sorted(described) or 'none'})"
        )

    script = a.script or rec.get("script")
    if not script:
        raise SweepError("--script: no script given (and no recipe with a `script` key)")
    spath = Path(script)
    if not spath.is_absolute():  # the repository root first, then the current directory
        spath = ROOT / spath if (ROOT / spath).is_file() else spath.resolve()
    if not spath.is_file():
        raise SweepError(f"--script {script}: no such file (relative paths are taken from {ROOT})")

    seeds = a.seeds if a.seeds is not None else rec.get("seeds", [1])
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise SweepError(f"{'--seeds' if a.seeds is not None else where_rec + ': seeds'}: seed {repeated[0]} repeated")
    cwd = Path(a.cwd)
    if not cwd.is_dir():
        raise SweepError(f"--cwd {a.cwd}: no such directory")
    if not a.dry_run:  # where the jobs and the sweep write, and what runs them (a dry run writes and runs nothing)
        if folder_problem(cwd / "runs"):
            raise SweepError(
                f"--cwd {a.cwd}: the jobs write their runs into {cwd / 'runs'}: {folder_problem(cwd / 'runs')}"
            )
        if a.out and folder_problem(a.out):
            raise SweepError(f"--out {a.out}: {folder_problem(a.out)}")
        if a.launcher != "slurm" and shutil.which(a.python) is None:
            raise SweepError(f"--python {a.python}: no such executable")

    setups = {
        k: (substitute(f"{where_rec} setup {k}", v, values, described), where_rec)
        for k, v in rec.get("setups", {}).items()
    }
    for opt in a.setup:
        name, flags = parse_setup(opt)
        setups[name] = (flags, f"--setup {name}")
    if a.only:
        missing = [n for n in a.only if n not in setups]
        if missing:
            raise SweepError(f"--only {missing[0]}: no such setup (have: {', '.join(setups)})")
        setups = {n: setups[n] for n in a.only}
    if not setups:
        raise SweepError('--setup: no setups given (use --setup NAME="FLAGS" or a recipe with [setups])')

    common = split_flags(
        f"{where_rec} common", substitute(f"{where_rec} common", rec.get("common", ""), values, described)
    )
    extra = split_flags("--common", a.common)
    for flag in RESERVED:
        if any(t == flag or t.startswith(flag + "=") for t in common + extra):
            raise SweepError(f"--common: must not contain {flag} (the sweep sets it per job)")
    parsed = {}
    for name, (flags, where) in setups.items():
        if not NAME_RE.match(name) or "__" in name:
            raise SweepError(
                f"{where}: setup name {name!r} must be letters, digits, '.', '-', '_' without '__' "
                "(it becomes --exp-name and part of the run folder name)"
            )
        toks = split_flags(where, flags)
        for flag in RESERVED:
            if any(t == flag or t.startswith(flag + "=") for t in toks):
                raise SweepError(f"{where}: must not contain {flag} (the sweep sets it per job)")
        parsed[name] = toks
    envs = a.envs if a.envs is not None else rec.get("envs") or [None]
    if envs != [None] and any(t == "--env-id" or t.startswith("--env-id=") for t in common + extra):
        raise SweepError("--envs: the recipe's envs (or --envs) set --env-id; remove it from common / --common")
    jobs = []
    for seed in seeds:  # seed-major: a partial sweep has every setup for its first seeds
        for env in envs:
            for name, toks in parsed.items():
                flags = [*common, *toks, *extra] + (["--env-id", env] if env else [])
                flags = [t.replace("${env}", env) for t in flags] if env else flags
                if any("${env}" in t for t in flags):
                    raise SweepError(f"setup {name} uses ${{env}}, but the recipe has no envs (give --envs)")
                cmd = [a.python, str(spath), *flags, "--exp-name", name, "--seed", str(seed)]
                jobs.append({"setup": name, "seed": seed, "env": env, "cmd": cmd})
    return spath, jobs


def job_env(job: dict = None, group: str = "") -> dict:
    """The variables a job adds to the environment of the machine it runs on: one thread per job; wandb group (the
    sweep's name) and tags (setup, env) for --track runs."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if job is not None:
        env["WANDB_RUN_GROUP"] = group
        env["WANDB_TAGS"] = ",".join(t for t in (job["setup"], job.get("env")) if t)
    return env


def node_env(extra: dict) -> dict:
    """This machine's environment (a cluster node keeps its own CUDA_VISIBLE_DEVICES and SLURM_*) plus `extra`."""
    return {"MPLBACKEND": "Agg", **os.environ, **extra}


def ignore_usr2() -> None:
    """SLURM signals every process of a job with USR2 before its time limit (submitit's cue to requeue): the
    script ignores it, and stops with a checkpoint on the SIGTERM that ScriptJob.checkpoint sends it."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def log_stem(job: dict) -> str:
    """<setup>[__<env>]__<seed>: the name of a job's .out/.err logs."""
    return "__".join([job["setup"], *([job["env"].replace("/", "_")] if job.get("env") else []), str(job["seed"])])


def with_resume(cmd: list) -> list:
    """The command a requeued job runs: the same, continuing from its newest checkpoint."""
    return cmd if "--resume" in cmd else [*cmd, "--resume", "auto"]


class ScriptJob:
    """A submitit job running one script command. On preemption or timeout submitit calls `checkpoint`: the
    script gets SIGTERM (it writes a checkpoint and exits), and the job is requeued with `--resume auto`."""

    def __init__(self):
        self.proc = None

    def __call__(self, cmd: list, cwd: str, env: dict, stdout: str, stderr: str) -> int:
        """Run `cmd` on the node, with `env` (job_env) added to the node's own environment."""
        with open(stdout, "a") as fo, open(stderr, "a") as fe:
            io = dict(stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=node_env(env), preexec_fn=ignore_usr2, **io)
            return self.proc.wait()

    def checkpoint(self, cmd: list, cwd: str, env: dict, stdout: str, stderr: str):
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return submitit.helpers.DelayedSubmission(ScriptJob(), with_resume(cmd), cwd, env, stdout, stderr)


def run_submitit(jobs: list, cwd: Path, out: Path, a, group: str) -> list:
    """Submit every job as one array (SLURM) or run them through submitit's local executor; wait for all."""
    import submitit

    cluster = "slurm" if a.launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=str(out / "submitit"), cluster=cluster)
    params = dict(timeout_min=a.time, cpus_per_task=a.cpus, gpus_per_node=a.gpus, mem_gb=a.mem_gb, name=group)
    if cluster == "slurm":
        params.update(slurm_partition=a.partition, slurm_array_parallelism=a.jobs)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    handles = []
    with executor.batch():  # one SLURM array job
        for job in jobs:
            stem = log_stem(job)
            job["stdout"], job["stderr"] = str(out / f"{stem}.out"), str(out / f"{stem}.err")
            args = (job["cmd"], str(cwd), job_env(job, group), job["stdout"], job["stderr"])
            handles.append((job, executor.submit(ScriptJob(), *args)))
    for job, handle in handles:
        t0 = time.time()
        try:
            job["returncode"] = handle.result()
        except Exception as e:  # the job itself failed (killed, not scheduled, ...)
            job["returncode"], job["last_stderr"] = -1, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        job["wall_s"], job["submitit_id"] = round(time.time() - t0, 2), handle.job_id
        if job["returncode"] != 0 and "last_stderr" not in job:
            job["last_stderr"] = error_line(Path(job["stderr"]))
        print(
            f"{'done' if job['returncode'] == 0 else 'FAILED'} {job['setup']} seed {job['seed']} (job {handle.job_id})"
        )
    return [j for j, _ in handles]


BOX_CHARS = "".join(map(chr, range(0x2500, 0x2580)))  # box drawing: tyro prints its errors inside such a box


def error_line(path: Path) -> str:
    """The line of a failed job's stderr that says what went wrong: the last `error: ...` line, the exception line
    that ends a traceback, or the message inside a box tyro drew (its first paragraph, without the border), whichever
    came last; without any of them, the last line."""
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    found, last, box, in_traceback = [], "", None, False
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line[0] in "╭┌┏":  # a box opens: collect its paragraphs
            box = [[]]
            continue
        if box is not None:
            if line[0] in "╰└┗":  # it closes: its first paragraph is the message
                message = " ".join(" ".join(next((p for p in box if p), [])).split())
                if message:
                    found.append(message)
                box = None
            elif not line.strip(BOX_CHARS + " "):  # a rule between paragraphs
                box.append([])
            else:
                box[-1].append(line.strip(BOX_CHARS + " "))
            continue
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and raw[0] not in " \t":  # the first line not indented: the exception
            found.append(line)
            in_traceback = False
        elif re.search(r"(^|: )error: ", line):
            found.append(line)
        if line.strip(BOX_CHARS + " "):
            last = line.strip(BOX_CHARS + " ")
    return found[-1] if found else last


def run_jobs(jobs: list, cwd: Path, out: Path, n_parallel: int, quiet: bool = False, group: str = "") -> list:
    pending = list(jobs)
    running = []  # (job, Popen, files, t0)
    done = []
    t_start = time.time()

    def log(msg):
        if not quiet:
            print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    try:
        while pending or running:
            while pending and len(running) < n_parallel:
                job = pending.pop(0)
                stem = log_stem(job)
                job["stdout"], job["stderr"] = str(out / f"{stem}.out"), str(out / f"{stem}.err")
                fo, fe = open(job["stdout"], "w"), open(job["stderr"], "w")
                p = subprocess.Popen(
                    job["cmd"],
                    cwd=cwd,
                    env=node_env(job_env(job, group)),
                    stdout=fo,
                    stderr=fe,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
                running.append((job, p, (fo, fe), time.time()))
                log(f"start {job['setup']} seed {job['seed']} (pid {p.pid})")
            time.sleep(0.1)
            for item in list(running):
                job, p, files, t0 = item
                rc = p.poll()
                if rc is None:
                    continue
                for f in files:
                    f.close()
                running.remove(item)
                job.update(returncode=rc, wall_s=round(time.time() - t0, 2))
                if rc != 0:
                    job["last_stderr"] = error_line(Path(job["stderr"]))
                done.append(job)
                log(
                    f"{'done' if rc == 0 else 'FAILED'} {job['setup']} seed {job['seed']} "
                    f"(exit {rc}, {job['wall_s']:.1f}s)"
                )
    except KeyboardInterrupt:
        for _job, p, _files, _ in running:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the job's own process group (start_new_session)
            except ProcessLookupError:
                pass
        for job, p, files, _ in running:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            for f in files:
                f.close()
            job.update(returncode=p.returncode, wall_s=None, last_stderr="interrupted by the user")
            done.append(job)
        for job in pending:
            job.update(returncode=None, wall_s=None, last_stderr="not started (interrupted)")
            done.append(job)
        print("\ninterrupted: running jobs were stopped", file=sys.stderr)
    order = {id(j): i for i, j in enumerate(jobs)}
    return sorted(done, key=lambda j: order[id(j)])


def summary(jobs: list) -> str:
    failed = [j for j in jobs if j.get("returncode") != 0]
    lines = [f"{len(jobs) - len(failed)}/{len(jobs)} jobs succeeded"]
    if failed:
        lines.append(f"{len(failed)} failed:")
        for j in failed:
            rc = j.get("returncode")
            lines.append(
                f"  FAILED {j['setup']} seed {j['seed']} (exit {rc}): {j.get('last_stderr') or '(no stderr)'}"
                f"  [log: {j.get('stderr', '-')}]"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="TOML recipe (script, seeds, common, vars, setups); see benchmark/recipes/")
    ap.add_argument("--script", help="script to run (overrides the recipe's), e.g. dqn_atari_injection.py")
    ap.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar='NAME="FLAGS"',
        help="a setup (repeatable); NAME becomes --exp-name; replaces a recipe setup of that name",
    )
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these setups (of the recipe / --setup)")
    ap.add_argument("--seeds", type=int, nargs="+", check=seed_problem, help="seeds (default: the recipe's, else 1)")
    ap.add_argument("--envs", nargs="+", metavar="ENV_ID", help="env ids, one --env-id per job (default: the recipe's)")
    ap.add_argument("--common", default="", help="flags appended to every job, after the setup's (they win)")
    ap.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="value of a ${NAME} placeholder of the recipe (repeatable)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        check=at_least(1),
        help="jobs run at the same time (default 1), one thread each",
    )
    ap.add_argument("--cwd", default=".", help="working directory of the jobs; runs go to <cwd>/runs/ (default .)")
    ap.add_argument(
        "--out",
        help="folder for the logs and summary.json "
        "(default <cwd>/runs/_sweeps/<recipe or script name>_<YYYYmmdd-HHMMSS>)",
    )
    ap.add_argument("--python", default=sys.executable, help="Python interpreter of the jobs (default: this one)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit; nothing is run or written")
    ap.add_argument(
        "--launcher",
        choices=["local", "submitit-local", "slurm"],
        default="local",
        help="local subprocesses (default), submitit's local executor, or a SLURM array job through submitit",
    )
    ap.add_argument("--partition", help="SLURM partition (--launcher slurm)")
    ap.add_argument("--gpus", type=int, check=at_least(0), help="GPUs per job (submitit)")
    ap.add_argument("--cpus", type=int, default=1, check=at_least(1), help="CPUs per job (submitit, default 1)")
    ap.add_argument(
        "--mem-gb", type=float, check=above(0), help="memory per job in GB (submitit; DQN Atari needs about 10)"
    )
    ap.add_argument(
        "--time", type=int, default=60, check=at_least(1), help="time limit per job in minutes (submitit, default 60)"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    a = ap.parse_args(argv)
    try:
        spath, jobs = build_jobs(a)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cwd = Path(a.cwd).resolve()
    if a.dry_run:
        print(f"# {len(jobs)} jobs, at most {a.jobs} at a time, in {cwd}")
        for j in jobs:
            print("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " + shlex.join(j["cmd"]))
        return 0
    name = Path(a.recipe).stem if a.recipe else spath.stem
    out = Path(a.out) if a.out else cwd / "runs" / "_sweeps" / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {out}: cannot create ({e.strerror})", file=sys.stderr)
        return 2
    print(
        f"{len(jobs)} jobs ({len(set(j['setup'] for j in jobs))} setups x {len(set(j['seed'] for j in jobs))} seeds), "
        f"at most {a.jobs} at a time, in {cwd}; logs in {out}",
        flush=True,
    )
    t0 = time.time()
    if a.launcher == "local":
        done = run_jobs(jobs, cwd, out, a.jobs, quiet=a.quiet, group=name)
    else:
        done = run_submitit(jobs, cwd, out, a, group=name)
    info = {
        "script": str(spath),
        "cwd": str(cwd),
        "recipe": a.recipe,
        "wall_s": round(time.time() - t0, 2),
        "jobs": [
            {
                k: j.get(k)
                for k in ("setup", "seed", "env", "cmd", "returncode", "wall_s", "stdout", "stderr", "last_stderr")
            }
            for j in done
        ],
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / "summary.json")
    print(summary(done))
    print(f"wall time {time.time() - t0:.1f}s; summary: {out / 'summary.json'}")
    return 0 if all(j.get("returncode") == 0 for j in done) else 1


if __name__ == "__main__":
    sys.exit(main())
