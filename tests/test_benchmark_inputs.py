"""benchmark/report.py and benchmark/sweep.py: every bad argument stops the tool with one `error: ...` line naming the
flag (or the recipe file and key), exit code 2, no traceback, and nothing written; a failed sweep job is summarised by
its real error line. One parametrised test per family of bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SWEEP = ROOT / "benchmark" / "sweep.py"
REPORT = ROOT / "benchmark" / "report.py"
ROOT_USER = os.geteuid() == 0  # root writes into a read-only folder: chmod cannot make one unwritable for it
needs_non_root = pytest.mark.skipif(ROOT_USER, reason="root can write into any folder (see the os.access test)")


def run(tool, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, str(tool), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def listing(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def write_run(root, name, scalars):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(root / name))
    for key, pts in scalars.items():
        for step, v in pts:
            w.add_scalar(key, v, step)
    w.close()


@pytest.fixture
def work(tmp_cwd):
    """A folder with three tiny runs (runs/), an empty folder, a file, a read-only folder and a fake script that
    exits at once (a sweep that wrongly started its jobs would still end quickly)."""
    for setup, seed in (("plain", 1), ("plain", 2), ("inject", 1)):
        write_run(
            tmp_cwd / "runs",
            f"CartPole-v1__{setup}__{seed}__100",
            {"eval/episodic_return": [(10, 1.0), (20, float(seed))], "plasticity/dormant_ratio_mean": [(10, 0.1)]},
        )
    (tmp_cwd / "empty").mkdir()
    (tmp_cwd / "junk" / "not_a_run").mkdir(parents=True)
    (tmp_cwd / "afile").write_text("x")
    (tmp_cwd / "fake.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_cwd / "ro").mkdir()
    (tmp_cwd / "ro").chmod(0o555)
    (tmp_cwd / "runs_file_cwd").mkdir()
    (tmp_cwd / "runs_file_cwd" / "runs").write_text("x")  # the jobs would write their runs into a file
    yield tmp_cwd
    (tmp_cwd / "ro").chmod(0o755)


def recipe(folder: Path, body: str) -> str:
    (folder / "r.toml").write_text('script = "fake.py"\n' + body)
    return "r.toml"


def check_one_line_error(tool, args, names, cwd):
    """Run the tool; it must exit 2 with one `error:` line naming each of `names`, no traceback, nothing written."""
    before = listing(cwd)
    r = run(tool, *args, cwd=cwd)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for name in names:
        assert name in r.stderr, (name, r.stderr)
    assert listing(cwd) == before  # checked before anything was written
    return r.stderr


SWEEP_OK = ["--script", "fake.py", "--setup", "a="]  # a sweep that would be valid without the flag under test


@pytest.mark.parametrize(
    "args, names",
    [
        (["--reps", 0], ["--reps 0", ">= 100"]),
        (["--reps", -5], ["--reps -5"]),
        (["--reps", 99], ["--reps 99", ">= 100"]),
        (["--reps", "many"], ["--reps", "'many'"]),
        (["--reps", "1.5"], ["--reps", "'1.5'"]),
    ],
)
def test_bootstrap_repetitions_must_be_an_integer_of_at_least_100(work, args, names):
    check_one_line_error(REPORT, ["runs", "--out", "rep", *args], names, work)


@pytest.mark.parametrize(
    "tool, args, names",
    [
        (REPORT, ["--steps", 0], ["--steps 0", ">= 1"]),
        (REPORT, ["--steps", -100], ["--steps -100"]),
        (REPORT, ["--steps", "1e5"], ["--steps", "'1e5'"]),
        (REPORT, ["--at-step", 10, -1], ["--at-step -1", ">= 0"]),
        (REPORT, ["--precision", -1], ["--precision -1"]),
        (SWEEP, [*SWEEP_OK, "--jobs", 0], ["--jobs 0: must be >= 1"]),
        (SWEEP, [*SWEEP_OK, "--time", 0], ["--time 0"]),
        (SWEEP, [*SWEEP_OK, "--cpus", 0], ["--cpus 0"]),
        (SWEEP, [*SWEEP_OK, "--gpus", -1], ["--gpus -1"]),
    ],
)
def test_step_counts_and_other_counts_must_be_in_range(work, tool, args, names):
    check_one_line_error(tool, ["runs", "--out", "rep", *args] if tool == REPORT else args, names, work)


@pytest.mark.parametrize(
    "tool, args, names",
    [
        (REPORT, ["--threshold", "nan"], ["--threshold nan", "finite"]),
        (REPORT, ["--threshold", "inf"], ["--threshold inf", "finite"]),
        (REPORT, ["--threshold=-inf"], ["--threshold -inf", "finite"]),
        (REPORT, ["--threshold", "high"], ["--threshold", "'high'"]),
        (SWEEP, [*SWEEP_OK, "--mem-gb", "nan"], ["--mem-gb nan", "finite"]),
        (SWEEP, [*SWEEP_OK, "--mem-gb", 0], ["--mem-gb 0", "> 0"]),
    ],
)
def test_thresholds_must_be_finite_numbers(work, tool, args, names):
    check_one_line_error(tool, ["runs", "--out", "rep", *args] if tool == REPORT else args, names, work)


@pytest.mark.parametrize(
    "args, names",
    [
        (["--key", "eval/episodic_retrun"], ["--key eval/episodic_retrun", "did you mean eval/episodic_return?"]),
        (
            ["--metric", "plasticity/dormant_ratio_maen"],
            ["--metric plasticity/dormant_ratio_maen", "did you mean plasticity/dormant_ratio_mean?"],
        ),
        (["--metric", "zzz"], ["--metric zzz", "keys the runs have: eval/episodic_return, plasticity/dormant"]),
        (["--baseline", "plian"], ["--baseline plian", "did you mean plain?"]),
        (["--baseline", "zzz"], ["--baseline zzz", "have: inject, plain"]),
    ],
)
def test_an_unknown_key_or_setup_is_named_with_suggestions_from_the_runs(work, args, names):
    check_one_line_error(REPORT, ["runs", "--out", "rep", *args], names, work)


@pytest.mark.parametrize(
    "tool, args, body, names",
    [
        (REPORT, ["runs", "--seeds"], None, ["--seeds", "expected at least one"]),
        (SWEEP, [*SWEEP_OK, "--seeds"], None, ["--seeds", "expected at least one"]),
        (SWEEP, ["--recipe", "r.toml"], "seeds = []\n[setups]\na = ''\n", ["--recipe r.toml: seeds = []"]),
        (SWEEP, ["--recipe", "r.toml"], "seeds = [1]\nenvs = []\n[setups]\na = ''\n", ["--recipe r.toml: envs = []"]),
        (SWEEP, ["--recipe", "r.toml", "--seeds", 2, 2], "[setups]\na = ''\n", ["--seeds: seed 2 repeated"]),
        (SWEEP, ["--recipe", "r.toml"], "seeds = [3, 3]\n[setups]\na = ''\n", ["--recipe r.toml: seeds: seed 3"]),
    ],
)
def test_an_empty_or_repeated_seed_list_is_refused(work, tool, args, body, names):
    if body is not None:
        recipe(work, body)
    check_one_line_error(tool, args, names, work)


@pytest.mark.parametrize(
    "tool, args, body, names",
    [
        (SWEEP, [*SWEEP_OK, "--seeds", -1], None, ["--seeds -1", "0 <= seed < 2**32"]),
        (SWEEP, [*SWEEP_OK, "--seeds", 1, 2**32], None, ["--seeds 4294967296", "0 <= seed < 2**32"]),
        (SWEEP, ["--recipe", "r.toml"], f"seeds = [1, {2**32}]\n[setups]\na = ''\n", ["--recipe r.toml: seeds: 4294"]),
        (SWEEP, ["--recipe", "r.toml"], "seeds = [-7]\n[setups]\na = ''\n", ["--recipe r.toml: seeds: -7"]),
        (REPORT, ["runs", "--seeds", 1, -1], None, ["--seeds -1", "0 <= seed < 2**32"]),
        (REPORT, ["runs", "--seeds", 2**32 + 5], None, ["--seeds 4294967301"]),
    ],
)
def test_seeds_outside_what_numpy_torch_and_random_accept_are_refused(work, tool, args, body, names):
    if body is not None:
        recipe(work, body)
    check_one_line_error(tool, args, names, work)


@pytest.mark.parametrize(
    "tool, args, names",
    [
        (REPORT, ["runs", "--out", "afile"], ["--out afile: is a file, not a folder"]),
        (REPORT, ["runs", "--out", "afile/sub"], ["--out afile/sub", "afile is a file"]),
        (REPORT, ["runs", "--plot", "empty.png"], ["--plot empty.png: is a folder"]),
        (SWEEP, [*SWEEP_OK, "--out", "afile"], ["--out afile: is a file, not a folder"]),
        (SWEEP, [*SWEEP_OK, "--out", "afile/logs"], ["--out afile/logs", "afile is a file"]),
        (SWEEP, [*SWEEP_OK, "--cwd", "runs_file_cwd"], ["--cwd runs_file_cwd", "is a file"]),
        (SWEEP, [*SWEEP_OK, "--python", "no-such-python"], ["--python no-such-python"]),
        pytest.param(REPORT, ["runs", "--out", "ro"], ["--out ro: the folder is not writable"], marks=needs_non_root),
        pytest.param(REPORT, ["runs", "--out", "ro/rep"], ["--out ro/rep", "not writable"], marks=needs_non_root),
        pytest.param(REPORT, ["runs", "--plot", "ro/c.png"], ["--plot ro/c.png", "not writable"], marks=needs_non_root),
        pytest.param(SWEEP, [*SWEEP_OK, "--out", "ro"], ["--out ro", "not writable"], marks=needs_non_root),
        pytest.param(SWEEP, [*SWEEP_OK, "--cwd", "ro"], ["--cwd ro", "not writable"], marks=needs_non_root),
    ],
)
def test_an_output_folder_that_is_a_file_or_not_writable_is_refused_before_any_work(work, tool, args, names):
    (work / "empty.png").mkdir()
    check_one_line_error(tool, args, names, work)


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_inputs_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "tool, args, names",
    [
        (REPORT, ["runs", "--out", "ro"], ["--out ro: the folder is not writable"]),
        (REPORT, ["runs", "--out", "ro/rep"], ["--out ro/rep", "not writable"]),
        (REPORT, ["runs", "--plot", "ro/c.png"], ["--plot ro/c.png", "not writable"]),
        (SWEEP, [*SWEEP_OK, "--out", "ro"], ["--out ro", "not writable"]),
        (SWEEP, [*SWEEP_OK, "--cwd", "ro"], ["--cwd ro", "not writable"]),
    ],
)
def test_not_writable_folders_are_refused_as_os_access_says(work, monkeypatch, capsys, tool, args, names):
    """The same cases for any user (root included): `ro` is what os.access calls unwritable."""
    real_access, ro = os.access, (work / "ro").resolve()

    def access(path, mode, **kw):
        return not (isinstance(path, (str, os.PathLike)) and Path(path).resolve() == ro) and real_access(
            path, mode, **kw
        )

    monkeypatch.setattr(os, "access", access)
    before = listing(work)
    assert load(tool).main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(n in err for n in names), err
    assert listing(work) == before


@pytest.mark.parametrize(
    "args, names",
    [
        (["nosuch"], ["error: nosuch: no such file or directory"]),
        (["empty"], ["error: no runs found under empty"]),
        (["junk"], ["error: no runs found under junk"]),
        (["afile"], ["error: no runs found under afile"]),
        (["runs", "nosuch"], ["error: nosuch: no such file or directory"]),
    ],
)
def test_a_missing_or_empty_runs_folder_is_named(work, args, names):
    check_one_line_error(REPORT, [*args, "--out", "rep"], names, work)


def test_boundary_values_that_are_valid_still_run(work):
    r = run(
        REPORT,
        "runs",
        *("--reps", 100, "--steps", 1, "--threshold", -45, "--at-step", 0, "--precision", 0),
        *("--seeds", 0, 2**32 - 1, "--metric", "plasticity/dormant_ratio_mean", "--baseline", "plain", "--out", "rep"),
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    assert (work / "rep" / "report.md").is_file() and (work / "rep" / "metrics.png").is_file()
    r = run(SWEEP, *SWEEP_OK, "--seeds", 0, 2**32 - 1, "--gpus", 0, "--mem-gb", 0.5, "--dry-run", cwd=work)
    assert r.returncode == 0, r.stderr
    assert [ln.split()[-1] for ln in r.stdout.splitlines()[1:]] == ["0", "4294967295"]


# ---------------------------------------------------------------- a failed job's summary line

FAKE_TYRO = """
import atexit, dataclasses, sys
import tyro

@dataclasses.dataclass
class Args:
    exp_name: str = "x"
    seed: int = 1
    n: int = 1
    boom: bool = False
    complain: bool = False

atexit.register(lambda: print("note: shutting down", file=sys.stderr))  # noise after the error, as wandb prints
a = tyro.cli(Args)
print("warming up", file=sys.stderr)
if a.boom:
    raise ValueError("kaboom")
if a.complain:
    print("error: --n must be positive", file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.parametrize(
    "flags, parts",
    [
        ("--n abc", ["--n", "invalid literal for int()", "'abc'"]),  # tyro's box: the message inside it
        ("--nope 3", ["Unrecognized options: --nope"]),
        ("--boom", ["ValueError: kaboom"]),  # the traceback's exception line, not the noise printed after it
        ("--complain", ["error: --n must be positive"]),  # the last error: line
    ],
)
def test_a_failed_job_is_summarised_by_its_error_line_not_a_box_border(tmp_cwd, flags, parts):
    (tmp_cwd / "job.py").write_text(FAKE_TYRO)
    r = run(SWEEP, "--script", "job.py", "--setup", f"s={flags}", "--out", "logs", "--quiet", cwd=tmp_cwd)
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if "FAILED s seed 1" in ln]
    said = line.split("): ", 1)[1].split("  [log: ")[0]
    (job,) = json.loads((tmp_cwd / "logs" / "summary.json").read_text())["jobs"]
    assert job["last_stderr"] == said
    assert all(p in said for p in parts), said
    assert not any(0x2500 <= ord(c) < 0x2580 for c in said), said  # no box-drawing characters
    assert "For full helptext" not in said and "note: shutting down" not in said
