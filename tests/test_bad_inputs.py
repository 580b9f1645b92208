"""Every family of bad input, for each script that has the flag: a non-zero exit, exactly one line on stderr,
`error: ...` naming the flag or file, no traceback, no file written. Then what a first run says: the start line, the
progress display (a status line in a log, a tqdm bar in a terminal) and --verbose's episode lines.

The bad-input cases run as `python SCRIPT FLAGS` would, but share one process per script that imports the script's
libraries once: it forks a child per case, which runs the script as __main__ (runpy, as the interpreter does) with
that case's argv, stdout and stderr, in a folder of its own, an uncaught exception going to sys.excepthook (exit 1)."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, read_scalars, run_script

DQN, PPO, IQL = "dqn_atari_injection", "ppo_atari_injection", "iql_pointmass_injection"
# tiny, valid runs: each case adds its one bad flag (later flags win in tyro)
BASE = {
    DQN: "--env-id CartPole-v1 --total-timesteps 300 --learning-starts 100 --buffer-size 300 --eval-episodes 0 "
    "--metrics-every 0 --no-cuda",
    PPO: "--num-envs 2 --num-steps 16 --num-minibatches 2 --update-epochs 1 --total-timesteps 64 --no-cuda",
    IQL: "--hidden-sizes 8 --batch-size 16 --dataset-kind random --dataset-steps 100 --offline-steps 20 "
    "--online-steps 10 --eval-every 20 --eval-episodes 1 --metrics-every 0 --no-cuda",
}
RUNNER = r"""
import json, os, runpy, sys
script, log, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
runpy.run_path(script, run_name="warm")  # the imports, once
codes = []
for i, (folder, argv) in enumerate(cases):
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.chdir(folder)
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{log}/{i}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv, code = [script, *argv], 1
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def listing(folder) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_cases(script: str, cases: list, tmp_cwd) -> list:
    """cases: [(flags, prepare(folder) or None)]; returns [(exit status, stdout, stderr, files before, after)]."""
    log, folders = tmp_cwd / "logs", []
    log.mkdir()
    for i, (_, prepare) in enumerate(cases):
        folders.append(tmp_cwd / f"case{i}")
        folders[-1].mkdir()
        if prepare:
            prepare(folders[-1])
    before = [listing(f) for f in folders]
    argv = [[*BASE[script].split(), *flags] for flags, _ in cases]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            str(ROOT / f"{script}.py"),
            str(log),
            json.dumps(list(zip(map(str, folders), argv))),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    read = lambda i, name: (log / f"{i}.{name}").read_text()
    return [(codes[i], read(i, "out"), read(i, "err"), before[i], listing(f)) for i, f in enumerate(folders)]


def assert_one_error_line(result, words, flags, written_ok=False):
    code, out, err, before, after = result
    assert code != 0 and "Traceback" not in err, (flags, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (flags, err[-2000:])
    for w in words:
        assert w in lines[0], (flags, lines[0])
    assert written_ok or after == before, (flags, sorted(set(after) - set(before)))


def npz(name: str, n: int = 50, **bad):
    """A --dataset file with n transitions and the given arrays replaced."""

    def prepare(folder):
        rng = np.random.default_rng(0)
        data = dict(observations=rng.random((n, 2), dtype=np.float32), actions=rng.integers(0, 5, n))
        data.update(rewards=-np.ones(n), next_observations=rng.random((n, 2)), terminals=np.zeros(n, bool))
        np.savez(folder / name, **dict(data, **bad))

    return prepare


def sb3_zip(n_actions: int):
    """A real SB3 PPO CnnPolicy zip (4x84x84 uint8 frames, `n_actions` actions), saved by stable-baselines3."""
    import gymnasium as gym
    from stable_baselines3 import PPO as SB3PPO

    class Frames(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
        action_space = gym.spaces.Discrete(n_actions)

        def reset(self, *, seed=None, options=None):
            return np.zeros((4, 84, 84), np.uint8), {}

        def step(self, action):
            return np.zeros((4, 84, 84), np.uint8), 0.0, False, False, {}

    def prepare(folder):
        SB3PPO("CnnPolicy", Frames(), n_steps=16, batch_size=16, device="cpu").save(folder / f"agent{n_actions}.zip")

    return prepare


def a_file(name: str):
    return lambda folder: (folder / name).write_text("a file where a folder should be")


# (script, flags, words the error line holds, prepare the case's folder); grouped by family
SEEDS = [
    (DQN, ["--seed", "-1"], ["--seed -1"], None),
    (PPO, ["--seed", str(2**32)], ["--seed 4294967296"], None),
    (IQL, ["--seed", str(2**32)], ["--seed 4294967296"], None),
    (IQL, ["--dataset-seed", "-5"], ["--dataset-seed -5"], None),
]
RUN_NAMES = [
    (DQN, ["--exp-name", "../escape"], ["--exp-name '../escape'"], None),
    (DQN, ["--exp-name", "/tmp/absolute"], ["--exp-name '/tmp/absolute'"], None),
    (PPO, ["--exp-name", "a/b"], ["--exp-name 'a/b'"], None),
    (IQL, ["--exp-name", ".."], None, None),  # no '/': a name inside runs/ (see the valid cases below)
    (IQL, ["--exp-name", "../../x"], ["--exp-name '../../x'"], None),
    (DQN, ["--env-id", "../CartPole-v1"], ["--env-id '../CartPole-v1'"], None),
    (DQN, ["--env-id", "/CartPole-v1"], ["--env-id '/CartPole-v1'"], None),
    (PPO, ["--env-id", "../BreakoutNoFrameskip-v4"], ["--env-id '../BreakoutNoFrameskip-v4'"], None),
    (IQL, ["--env-id", "../PointmassHard-v0"], ["--env-id '../PointmassHard-v0'"], None),
]
MEANINGLESS = [
    (DQN, ["--tau", "0"], ["--tau 0.0"], None),
    (IQL, ["--tau", "0"], ["--tau 0.0"], None),
    (DQN, ["--sp-shrink", "1.5"], ["--sp-shrink 1.5", "<= 1"], None),
    (PPO, ["--sp-shrink", "2"], ["--sp-shrink 2.0"], None),
    (IQL, ["--sp-shrink", "1.01"], ["--sp-shrink 1.01"], None),
    (DQN, "--l2-schedule incremental --l2-start 1e-3 --l2-end 1e-4".split(), ["--l2-end 0.0001", "--l2-start"], None),
    (PPO, "--l2-schedule incremental --l2-start 1 --l2-end 0".split(), ["--l2-end 0.0", "--l2-start 1.0"], None),
    (IQL, "--l2-schedule incremental --l2-start 0.5 --l2-end 0.1".split(), ["--l2-end 0.1"], None),
    (PPO, ["--total-timesteps", "16"], ["--total-timesteps 16", "one rollout (32 steps)"], None),
    (DQN, ["--num-envs", "4", "--total-timesteps", "3"], ["--total-timesteps 3", "--num-envs"], None),
    (PPO, ["--num-minibatches", "3"], ["--num-minibatches 3", "does not divide", "32"], None),
    (PPO, ["--num-minibatches", "64"], ["--num-minibatches 64"], None),
    (DQN, ["--batch-size", "64", "--buffer-size", "32"], ["--buffer-size 32", "--batch-size 64"], None),
    (IQL, ["--batch-size", "101"], ["--batch-size 101", "--dataset-steps 100"], None),
]
DATA_FILES = [
    (IQL, ["--dataset", "big.npz"], ["big.npz", "rewards", "float32"], npz("big.npz", rewards=np.full(50, 1e300))),
    (
        IQL,
        ["--dataset", "nan.npz"],
        ["nan.npz", "next_observations", "NaN"],
        npz("nan.npz", next_observations=np.full((50, 2), np.nan)),
    ),
    (
        IQL,
        ["--dataset", "out.npz"],
        ["out.npz", "observations", "[0, 1]^2"],
        npz("out.npz", observations=np.full((50, 2), 1.5)),
    ),
    (
        IQL,
        ["--dataset", "neg.npz"],
        ["neg.npz", "next_observations", "[-0.1, "],
        npz("neg.npz", next_observations=np.full((50, 2), -0.1)),
    ),
    (
        IQL,
        ["--dataset", "few.npz"],
        ["few.npz", "actions", "10 transitions", "--batch-size (16)"],
        npz("few.npz", n=10),
    ),
    (IQL, ["--dataset", "scalar.npz"], ["scalar.npz", "actions has shape ()"], npz("scalar.npz", actions=np.int64(3))),
]
MODEL_FILES = [
    (
        PPO,
        ["--pretrained", "agent6.zip"],
        ["--pretrained agent6.zip", "6 actions", "BreakoutNoFrameskip-v4 has 4"],
        sb3_zip(6),
    ),
]
FOLDERS = [
    (IQL, ["--dataset-dir", "cache"], ["--dataset-dir cache", "a file"], a_file("cache")),
    (IQL, ["--dataset-dir", "cache/deeper"], ["--dataset-dir cache/deeper", "cache is a file"], a_file("cache")),
    (DQN, [], ["cannot create the run folder runs/"], a_file("runs")),
]
FAMILIES = dict(seeds=SEEDS, run_names=RUN_NAMES, meaningless=MEANINGLESS, data_files=DATA_FILES)
DIVERGENCE = [  # Adam steps of size 1e30: a later forward pass overflows (a run folder exists by then)
    (DQN, "--learning-rate 1e30 --learning-starts 50 --train-frequency 1".split(), ["losses/td_loss"], None),
    (PPO, "--learning-rate 1e30 --num-minibatches 1".split(), ["the policy's logits"], None),
    (IQL, "--learning-rate 1e30 --log-every 1".split(), ["_loss"], None),
]
FAMILIES.update(model_files=MODEL_FILES, folders=FOLDERS, divergence=DIVERGENCE)


@pytest.mark.parametrize("script", [DQN, PPO, IQL])
def test_every_family_of_bad_input_is_one_line_naming_the_flag_or_file_and_writes_nothing(tmp_cwd, script):
    cases = [
        (family, flags, words, prepare)
        for family, rows in FAMILIES.items()
        for s, flags, words, prepare in rows
        if s == script
    ]
    results = run_cases(script, [(flags, prepare) for _, flags, _, prepare in cases], tmp_cwd)
    for (family, flags, words, _), result in zip(cases, results):
        if words is None:  # a valid case among them
            assert result[0] == 0, (family, flags, result[2][-2000:])
        elif family == "divergence":  # the same message as every non-finite loss, naming the step
            words = [*words, "became non-finite (", "at global step", "try a lower --learning-rate"]
            assert_one_error_line(result, words, (family, flags), written_ok=True)
        else:
            assert_one_error_line(result, words, (family, flags))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_an_unwritable_dataset_folder_is_one_line_before_the_data_is_generated(tmp_cwd):
    (tmp_cwd / "locked").mkdir(mode=0o555)
    (result,) = run_cases(IQL, [(["--dataset-dir", "../locked/cache"], None)], tmp_cwd)
    assert_one_error_line(result, ["--dataset-dir ../locked/cache", "not writable"], "--dataset-dir")


def test_rounded_step_counts_and_a_continued_zip_are_said_in_one_line_each(tmp_cwd, capsys):
    dqn, ppo = load_script(DQN), load_script(PPO)
    args = dqn.Args(env_id="CartPole-v1", total_timesteps=1001, num_envs=2, learning_starts=100, buffer_size=500)
    dqn.validate_args(args)
    assert args.total_timesteps == 1000
    assert capsys.readouterr().out == "--total-timesteps rounded down to 1000, a multiple of --num-envs 2\n"
    sb3_zip(4)(tmp_cwd)
    args = ppo.Args(num_envs=2, num_steps=16, num_minibatches=2, total_timesteps=100, pretrained="agent4.zip")
    ppo.validate_args(args)
    assert args.num_iterations == 3 and capsys.readouterr().out.splitlines() == [
        "--total-timesteps 100 is not a whole number of rollouts: running 96 steps (3 rollouts of 32)",
        "continuing the 4-action agent of agent4.zip on BreakoutNoFrameskip-v4 (a zip names no game)",
    ]
    ppo.validate_args(ppo.Args(num_envs=2, num_steps=16, num_minibatches=2, total_timesteps=96))
    assert capsys.readouterr().out == ""  # whole numbers: nothing to say


def test_the_edges_of_each_range_are_valid(tmp_cwd):
    """Nothing valid before is refused now: the largest seed (also where ale-py, which takes seeds below 2**31, seeds
    its envs), a shrink of 1, a constant 'incremental' L2, a batch as large as the data, a name with '..' in it."""
    dqn, ppo, iql = load_script(DQN), load_script(PPO), load_script(IQL)
    for m in (dqn, ppo, iql):
        m.check_ranges(m.Args(seed=2**32 - 1, sp_shrink=1.0))
        m.check_intervention_args(m.Args(l2_schedule="incremental", l2_start=1e-4, l2_end=1e-4), 1000)
    iql.validate_args(iql.Args(batch_size=100, dataset_steps=100, dataset_seed=0))
    envs = ppo.AtariEnvs("BreakoutNoFrameskip-v4", 2, 2**32 - 1)
    envs.reset()
    envs.close()
    spec = dqn.make_env_spec(dqn.Args(env_id="BreakoutNoFrameskip-v4"))
    envs = dqn.make_envs(spec, dqn.Args(), 2)
    envs.reset(seed=dqn.env_seeds(envs, 2**32 - 1 + 200_000))
    envs.close()


# ---- what a first run says ------------------------------------------------------------------------------------------
EPISODE_LINE = re.compile(r"global_step=\d+, episodic_return=-?[\d.]+")


def test_a_log_gets_the_start_line_and_a_status_line_every_interval_not_episode_lines(tmp_cwd):
    flags = [f for f in BASE[IQL].split() if f != "--no-cuda"] + ["--online-steps", "150"]  # --cuda, the default
    proc = run_script(IQL, *flags, cwd=tmp_cwd, env={"PROGRESS_EVERY": "0"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    (start,) = [line for line in lines if line.startswith("run ")]
    device = "cuda" if torch.cuda.is_available() else "cpu (--cuda, but there is no CUDA device here)"
    assert re.fullmatch(rf"run runs/PointmassHard-v0__{IQL}__1__\d+: 170 steps on {re.escape(device)}.*", start)
    status = [re.fullmatch(r"step (\d+) of 170 \(\d+%\), \d+ steps/s, \d+:\d\d:\d\d left", line) for line in lines]
    steps = [int(m.group(1)) for m in status if m]
    assert len(steps) > 10 and steps == sorted(steps) and steps[-1] == 170, lines
    assert not [line for line in lines if EPISODE_LINE.fullmatch(line)]  # in TensorBoard only
    assert "charts/episodic_return" in read_scalars(glob.glob(str(tmp_cwd / "runs" / "*"))[0])


def test_verbose_brings_the_episode_lines_back(tmp_cwd):
    proc = run_script(PPO, *BASE[PPO].split(), "--max-episode-frames", "100", "--verbose", cwd=tmp_cwd)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert re.fullmatch(rf"run runs/BreakoutNoFrameskip-v4__{PPO}__1__\d+: 64 steps on cpu", lines[0]), lines
    assert len([line for line in lines if EPISODE_LINE.fullmatch(line)]) >= 2, lines
    assert not [line for line in lines if line.startswith("step ")]  # a short run: no status line yet


def run_in_terminal(script: str, *flags, cwd) -> tuple:
    """The script with stdin, stdout and stderr on a pseudo-terminal of 120 x 40: (exit status, what it showed)."""
    import fcntl
    import pty
    import struct
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / f"{script}.py"), *flags]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=child, stdout=child, stderr=child)
    os.close(child)
    shown = b""
    while True:
        try:
            data = os.read(main, 1 << 16)
        except OSError:  # EIO: the child's side is closed
            break
        if not data:
            break
        shown += data
    os.close(main)
    return proc.wait(timeout=60), shown.decode(errors="replace")


def test_a_terminal_gets_a_tqdm_bar_with_lines_printed_above_it(tmp_cwd):
    code, shown = run_in_terminal(DQN, *BASE[DQN].split(), "--inject-at", "150", "--eval-episodes", "1", cwd=tmp_cwd)
    assert code == 0, shown[-3000:]
    assert re.search(rf"run runs/CartPole-v1__{DQN}__1__\d+: 300 steps on cpu\r\n", shown), shown[:2000]
    bars = re.findall(r"\r *(\d+)%\|[^|\r]*\| *(\d+)/300 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+k?step/s\]", shown)
    assert len(bars) > 3 and bars[-1] == ("100", "300"), shown[-2000:]
    said = [line.split("\r")[-1] for line in shown.split("\r\n") if "global_step=" in line]
    assert len(said) == 2 and "injection:" in said[0] and "eval/episodic_return=" in said[1], said
    assert all(line.startswith("global_step=") for line in said), said  # the bar was cleared first
