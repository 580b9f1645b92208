"""Checkpoints and resume: a run killed (SIGKILL), interrupted (Ctrl-C) or preempted (SIGTERM) continues with
`--resume auto`; on CPU DQN (CartPole) and IQL continue exactly, across an injection. PPO's Atari games cannot be
saved (ale-py), so a resumed PPO run starts new games: what it restores is checked exactly instead."""

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_blocks, load_script, read_scalars, run_script

DQN = "--env-id CartPole-v1 --total-timesteps 6000 --learning-starts 500 --buffer-size 2000 --inject-at 3500 "
DQN += "--metrics-every 500 --eval-every 0 --eval-episodes 2 --checkpoint-every 1000 --keep-checkpoints 20"
IQL = "--offline-steps 600 --online-steps 1200 --inject-at 1000 --dataset-steps 1000 --eval-every 400 "
IQL += "--eval-episodes 3 --metrics-every 200 --checkpoint-every 200 --keep-checkpoints 20 --dataset-dir datasets"
PPO = "--env-id BreakoutNoFrameskip-v4 --num-envs 2 --num-steps 32 --total-timesteps 1280 --inject-at 640 "
PPO += "--metrics-every 256 --eval-every 0 --checkpoint-every 128 --keep-checkpoints 20"
RUNS = {"dqn_atari_injection": DQN, "iql_pointmass_injection": IQL, "ppo_atari_injection": PPO}
TIMING = ("charts/SPS", "charts/rollout_time", "charts/update_time")  # wall-clock values differ between runs


def start(script: str, exp: str, cwd, *extra) -> subprocess.Popen:
    flags = [*RUNS[script].split(), "--no-cuda", "--save-model", "--exp-name", exp, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / f"{script}.py"), *flags]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(script: str, exp: str, cwd, *extra) -> subprocess.CompletedProcess:
    proc = run_script(script, *RUNS[script].split(), "--no-cuda", "--save-model", "--exp-name", exp, *extra, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_dir(cwd, exp: str) -> str:
    (folder,) = glob.glob(str(cwd / "runs" / f"*__{exp}__*"))  # a resumed run writes into its own folder
    return folder


def stop_after_first_checkpoint(proc: subprocess.Popen, cwd, exp: str, sig) -> None:
    while not glob.glob(str(cwd / "runs" / f"*__{exp}__*" / "checkpoints" / "step_*.pt")):
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
        time.sleep(0.02)
    proc.send_signal(sig)


def unfinish(folder: str) -> None:
    """Drop the mark of a finished run, as if it had been killed after its last checkpoint: it can be resumed."""
    os.remove(os.path.join(folder, "finished.json"))


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def model(folder: str) -> dict:
    (path,) = glob.glob(os.path.join(folder, "*.cleanrl_model"))
    return flat(torch.load(path, map_location="cpu", weights_only=False)["model"])


def assert_same_run(a: str, b: str) -> None:
    """Every logged number (wall-clock timings aside) and every final weight identical."""
    sa, sb = read_scalars(a), read_scalars(b)
    assert "injection/count" in sa
    for key in sorted(set(sa) | set(sb)):
        if key not in TIMING:
            assert sa.get(key) == sb.get(key), key
    ma, mb = model(a), model(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


def tree(folder) -> dict:
    """{path: sha256} of every file under `folder`: what must not change when a resume is refused."""
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def wait_for(proc: subprocess.Popen, pattern: str) -> None:
    while not glob.glob(pattern):
        assert proc.poll() is None, f"the run ended before {pattern}: {proc.stderr.read()[-2000:]}"
        time.sleep(0.02)


def plant_partial_write(folder: str, step: int) -> str:
    """What a SIGKILL in the middle of writing checkpoint `step` leaves: a truncated temporary file of a dead pid."""
    os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
    tmp = os.path.join(folder, "checkpoints", f".tmp-999999999-step_{step:012d}.pt")
    with open(tmp, "wb") as f:
        f.write(b"PK\x03\x04" + os.urandom(4096))
    return tmp


KILLS = {"dqn_atari_injection": (1000, 4000), "iql_pointmass_injection": (200, 1200)}  # checkpoint steps, see RUNS


@pytest.mark.parametrize("script", ["dqn_atari_injection", "iql_pointmass_injection"])
def test_sigkill_at_several_points_then_resume_auto_gives_the_uninterrupted_run(tmp_cwd, script):
    """Killed while writing its first checkpoint (restarted cleanly in its own folder), then right after the checkpoint
    that follows the injection; the event stream TensorBoard reads and the final weights equal an uninterrupted run's,
    and no temporary file is left."""
    finish(script, "whole", tmp_cwd)
    first, after_injection = KILLS[script]
    proc = start(script, "killed", tmp_cwd)
    wait_for(proc, str(tmp_cwd / "runs" / "*__killed__*" / "events.out.tfevents.*"))
    proc.kill()
    proc.wait(timeout=60)
    killed = run_dir(tmp_cwd, "killed")
    assert not glob.glob(os.path.join(killed, "checkpoints", "step_*.pt"))
    plant_partial_write(killed, first)
    proc = start(script, "killed", tmp_cwd, "--resume", "auto")  # no checkpoint: starts again from step 0 in it
    wait_for(proc, os.path.join(killed, "checkpoints", f"step_{after_injection:012d}.pt"))
    proc.kill()
    proc.wait(timeout=60)
    plant_partial_write(killed, after_injection + first)
    proc = finish(script, "killed", tmp_cwd, "--resume", "auto")
    assert f"resuming {os.path.relpath(killed, tmp_cwd)} (its own folder)" in proc.stdout
    assert run_dir(tmp_cwd, "killed") == killed  # one folder: no split run
    assert_same_run(run_dir(tmp_cwd, "whole"), killed)
    assert not glob.glob(os.path.join(killed, "**", ".tmp-*"), recursive=True)


def test_a_finished_run_is_not_trained_again(tmp_cwd):
    script = "dqn_atari_injection"
    finish(script, "run", tmp_cwd)
    folder = os.path.relpath(run_dir(tmp_cwd, "run"), tmp_cwd)
    before = tree(tmp_cwd)
    checkpoint = sorted(glob.glob(os.path.join(folder, "checkpoints", "step_*.pt")))[0]
    for resume in ("auto", folder, checkpoint):
        proc = run_script(script, *DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", resume, cwd=tmp_cwd)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
        assert proc.stdout.strip() == (
            f"{folder} finished at global step 6000; its results: {folder}/run.cleanrl_model; nothing to do"
        )
    assert tree(tmp_cwd) == before


def test_two_resumes_of_one_run_at_once_one_trains_the_other_stops_in_one_line(tmp_cwd):
    script = "dqn_atari_injection"
    proc = start(script, "run", tmp_cwd)
    stop_after_first_checkpoint(proc, tmp_cwd, "run", signal.SIGKILL)
    proc.wait(timeout=60)
    procs = [start(script, "run", tmp_cwd, "--resume", "auto") for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], errors
    loser = errors[codes.index(1)].strip().splitlines()
    folder = os.path.relpath(run_dir(tmp_cwd, "run"), tmp_cwd)
    assert loser == [f"error: {folder} is in use by another process (a run or resume of it); wait for it to end"]
    assert os.path.isfile(os.path.join(run_dir(tmp_cwd, "run"), "finished.json"))


REFUSED = [
    (["--env-id", "LunarLander-v3"], "--env-id 'CartPole-v1' (now 'LunarLander-v3')"),
    (["--layer-norm"], "--layer-norm False (now True)"),
    (["--buffer-size", "1000"], "--buffer-size 2000 (now 1000)"),
    (["--num-envs", "2"], "--num-envs 1 (now 2)"),
    (["--total-timesteps", "5000"], "--total-timesteps 6000 (now 5000)"),
    (["--learning-rate", "0.01"], "--learning-rate 0.0001 (now 0.01)"),
]


def test_a_refused_resume_changes_no_file_and_names_the_flag_and_a_resume_from_elsewhere_continues_in_place(tmp_cwd):
    script = "dqn_atari_injection"
    proc = start(script, "run", tmp_cwd)
    stop_after_first_checkpoint(proc, tmp_cwd, "run", signal.SIGKILL)
    proc.wait(timeout=60)
    folder = run_dir(tmp_cwd, "run")
    before = tree(tmp_cwd)
    base = [*DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", folder]
    for change, says in REFUSED:
        for allow in ([], ["--resume-allow-changes"]):
            proc = run_script(script, *base, *change, *allow, cwd=tmp_cwd)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            (line,) = proc.stderr.strip().splitlines()
            assert line.startswith("error: --resume: ") and says in line and "cannot change on resume" in line, line
            assert tree(tmp_cwd) == before
    proc = run_script(script, *base, "--eval-episodes", "3", cwd=tmp_cwd)  # allowed, but only when asked for
    assert proc.returncode == 1 and "--eval-episodes 2 (now 3); give the same flags, or --resume-allow-changes" in (
        proc.stderr
    )
    assert tree(tmp_cwd) == before
    checkpoint = sorted(glob.glob(os.path.join(folder, "checkpoints", "step_*.pt")))[-1]
    intact = Path(checkpoint).read_bytes()
    saved = torch.load(checkpoint, weights_only=False)
    del saved["networks"]["q_network"]["net.1.0.weight"]  # a file that does not fit the network these flags build
    torch.save(saved, checkpoint)
    before = tree(tmp_cwd)
    proc = run_script(script, *base, cwd=tmp_cwd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: --resume: {checkpoint} does not fit what these flags build (" in proc.stderr
    assert tree(tmp_cwd) == before
    Path(checkpoint).write_bytes(intact)  # the intact checkpoint again, resumed from another working folder
    elsewhere = tmp_cwd / "elsewhere"
    elsewhere.mkdir()
    longer = ["--total-timesteps", "7000", "--resume-allow-changes"]  # a longer run is a change it may make
    proc = run_script(script, *base[:-1], os.path.abspath(folder), *longer, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming {os.path.abspath(folder)} (its own folder)" in proc.stdout
    assert not (elsewhere / "runs").exists() and os.path.isfile(os.path.join(folder, "finished.json"))
    assert max(step for step, _ in read_scalars(folder)["losses/td_loss"]) == 6900


def test_iql_refuses_to_resume_on_a_changed_dataset_naming_the_file(tmp_cwd):
    script = "iql_pointmass_injection"
    proc = start(script, "run", tmp_cwd)
    stop_after_first_checkpoint(proc, tmp_cwd, "run", signal.SIGKILL)
    proc.wait(timeout=60)
    (dataset,) = glob.glob(str(tmp_cwd / "datasets" / "*.npz"))
    data = dict(np.load(dataset))
    data["rewards"][0] += 1.0
    np.savez(dataset, **data)
    before = tree(tmp_cwd)
    proc = run_script(script, *IQL.split(), "--no-cuda", "--exp-name", "run", "--resume", "auto", cwd=tmp_cwd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --resume: the dataset ") and os.path.relpath(dataset, tmp_cwd) in line
    assert "changed since" in line and tree(tmp_cwd) == before


def test_ctrl_c_at_the_first_line_of_train_writes_nothing(tmp_cwd):
    """SIGINT as soon as train() has taken over the signals (its SIGTERM handler shows in /proc): one line, exit 130,
    no traceback and no run folder."""
    proc = start("dqn_atari_injection", "early", tmp_cwd)
    while proc.poll() is None:
        with open(f"/proc/{proc.pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert not (tmp_cwd / "runs").exists()


@pytest.mark.parametrize(
    "script, sig", [("dqn_atari_injection", signal.SIGINT), ("iql_pointmass_injection", signal.SIGTERM)]
)
def test_ctrl_c_and_sigterm_stop_within_seconds_with_a_checkpoint_that_resumes_exactly(tmp_cwd, script, sig):
    finish(script, "whole", tmp_cwd)
    proc = start(script, "stopped", tmp_cwd)
    stop_after_first_checkpoint(proc, tmp_cwd, "stopped", sig)
    asked = time.time()
    _, err = proc.communicate(timeout=30)
    assert time.time() - asked < 10
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(sig).name} at global step ") and "--resume auto" in last
    checkpoint = last.split("checkpoint ")[1].split(";")[0]
    assert os.path.isfile(checkpoint)
    finish(script, "stopped", tmp_cwd, "--resume", "auto")
    assert_same_run(run_dir(tmp_cwd, "whole"), run_dir(tmp_cwd, "stopped"))


def test_ppo_stops_on_sigterm_restores_everything_but_the_games_and_resumes_across_an_injection(tmp_cwd):
    script = "ppo_atari_injection"
    finish(script, "whole", tmp_cwd)
    proc = start(script, "killed", tmp_cwd)
    stop_after_first_checkpoint(proc, tmp_cwd, "killed", signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "Traceback" not in err
    killed = run_dir(tmp_cwd, "killed")
    first = sorted(glob.glob(os.path.join(killed, "checkpoints", "step_*.pt")))[0]
    twin = os.path.join(run_dir(tmp_cwd, "whole"), "checkpoints", os.path.basename(first))
    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (first, twin))
    # the killed run saved exactly what the uninterrupted one had at that step
    for k, v in flat(a["networks"]).items():
        assert torch.equal(v, flat(b["networks"])[k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["numpy"][2] == b["rng"]["numpy"][2]
    assert a["optimizers"]["optimizer"]["params"] == b["optimizers"]["optimizer"]["params"]
    assert a["history"]["games"] == b["history"]["games"]
    # a resume with another number of envs is refused, even with --resume-allow-changes, and changes no file
    before = tree(tmp_cwd)
    proc = run_script(script, *PPO.split(), "--no-cuda", "--exp-name", "killed", "--resume", "auto", "--num-envs", "4",
                      "--resume-allow-changes", cwd=tmp_cwd)  # fmt: skip
    assert proc.returncode == 1 and "--num-envs 2 (now 4)" in proc.stderr, proc.stderr[-2000:]
    assert "; these cannot change on resume" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(tmp_cwd) == before
    # resuming twice from that checkpoint gives the same run (new games, seeded by the step), with the injection
    again = tmp_cwd / "again"
    again.mkdir()
    (again / "runs").mkdir()
    subprocess.run(["cp", "-r", killed, str(again / "runs")], check=True)
    for cwd in (tmp_cwd, again):
        finish(script, "killed", cwd, "--resume", "auto")
    assert_same_run(killed, run_dir(again, "killed"))
    assert read_scalars(killed)["injection/count"] == [(640, 1.0)]
    # every iteration's losses logged once (none lost or repeated around the checkpoint), equal up to it
    resumed, whole = (read_scalars(d)["losses/value_loss"] for d in (killed, run_dir(tmp_cwd, "whole")))
    assert [s for s, _ in resumed] == [s for s, _ in whole]
    stop = a["global_step"]
    assert [x for x in resumed if x[0] <= stop] == [x for x in whole if x[0] <= stop] and stop in dict(whole)


def test_a_corrupt_checkpoint_is_named_and_the_previous_one_still_resumes(tmp_cwd):
    script = "dqn_atari_injection"
    finish(script, "run", tmp_cwd)
    unfinish(run_dir(tmp_cwd, "run"))
    folder = os.path.relpath(os.path.join(run_dir(tmp_cwd, "run"), "checkpoints"), tmp_cwd)
    *_, previous, newest = sorted(glob.glob(os.path.join(folder, "step_*.pt")))
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    proc = run_script(script, *DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", "auto", cwd=tmp_cwd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert newest in proc.stderr and "truncated or corrupt" in proc.stderr and f"--resume {previous}" in proc.stderr
    proc = run_script(script, *DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", previous, cwd=tmp_cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bad_resume_paths_are_one_line(tmp_cwd):
    script = "dqn_atari_injection"
    finish(script, "run", tmp_cwd)
    for bad, says in (("missing.pt", "no such run folder or checkpoints/step_<N>.pt file"), (".", "no checkpoint")):
        proc = run_script(script, *DQN.split(), "--no-cuda", "--resume", bad, cwd=tmp_cwd)
        assert proc.returncode == 1 and says in proc.stderr and "Traceback" not in proc.stderr
    other = sorted(glob.glob(os.path.join(run_dir(tmp_cwd, "run"), "checkpoints", "*.pt")))[-1]
    os.remove(os.path.join(run_dir(tmp_cwd, "run"), "finished.json"))
    proc = run_script("iql_pointmass_injection", "--no-cuda", "--resume", other, cwd=tmp_cwd)
    assert proc.returncode == 1 and "not a checkpoint of iql_pointmass_injection.py" in proc.stderr
    old = torch.load(other, weights_only=False)
    del old["log_step"]  # as written before resumes used TensorBoard's purge
    torch.save(old, other)
    proc = run_script(script, *DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", other, cwd=tmp_cwd)
    assert proc.returncode == 1 and "written by an older version" in proc.stderr and "Traceback" not in proc.stderr


def on_a_run(blocks, folder="runs/r", keep=2):
    """The RUN state train() sets up, for calling the checkpoint helpers directly."""
    os.makedirs(folder, exist_ok=True)
    blocks.RUN.update(dir=folder, args={"script": "x", "keep_checkpoints": keep, "track": False}, checkpoint=None)
    blocks.RUN.update(writer=blocks.SummaryWriter(folder), stop=None)


def test_checkpoints_keep_the_newest_k_and_never_save_non_finite_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = load_blocks()
    args = type("A", (), {"checkpoint_every": 100})()
    assert [s for s in range(0, 1000, 32) if blocks.checkpoint_due(args, s, max(s - 32, 0))] == [
        s for s in range(32, 1000, 32) if s // 100 > (s - 32) // 100
    ]
    net = torch.nn.Linear(2, 2)
    on_a_run(blocks)
    for step in (100, 200, 300):
        blocks.save_checkpoint(step, step, {"net": net}, {}, {})
    assert [os.path.basename(p) for p in blocks.checkpoint_paths("runs/r/checkpoints")] == [
        "step_000000000200.pt",
        "step_000000000300.pt",
    ]
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(blocks.UserError, match=r"net has non-finite weights \(weight\) at global step 400; the last "):
        blocks.save_checkpoint(400, 400, {"net": net}, {}, {})
    assert len(blocks.checkpoint_paths("runs/r/checkpoints")) == 2
    with pytest.raises(blocks.UserError, match="non-finite .* the last good checkpoint is runs/r/checkpoints/step_"):
        blocks.check_finite(torch.tensor(float("inf")), "losses/td_loss", 401)


def test_a_failed_save_names_the_file_and_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = load_blocks()
    on_a_run(blocks)
    blocks.save_checkpoint(100, 100, {"net": torch.nn.Linear(2, 2)}, {}, {})
    (tmp_path / "runs" / "r" / "model.cleanrl_model").mkdir()  # a folder where the file should go: the save fails
    with pytest.raises(blocks.UserError, match=r"cannot write .*model.cleanrl_model .* checkpoint runs/r/chec"):
        blocks.atomic_save({"w": torch.zeros(3)}, "runs/r/model.cleanrl_model")
    assert not glob.glob(str(tmp_path / "runs" / "r" / ".tmp-*"))


def test_atari_dqn_without_the_buffer_in_checkpoints_resumes_with_new_games_and_refills_before_learning(tmp_cwd):
    script, exp = "dqn_atari_injection", "atari"
    flags = "--env-id BreakoutNoFrameskip-v4 --total-timesteps 1200 --learning-starts 300 --buffer-size 2000 "
    flags += "--inject-at 900 --eval-episodes 0 --metrics-every 0 --checkpoint-every 400 --no-checkpoint-buffer "
    flags = [*flags.split(), "--no-cuda", "--exp-name", exp]
    assert run_script(script, *flags, cwd=tmp_cwd).returncode == 0
    folder = run_dir(tmp_cwd, exp)
    checkpoint = os.path.join(folder, "checkpoints", "step_000000000400.pt")
    unfinish(folder)
    assert torch.load(checkpoint, weights_only=False)["buffer"] is None
    proc = run_script(script, *flags, "--resume", checkpoint, cwd=tmp_cwd)  # back to step 400, in the same folder
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [step for step, _ in read_scalars(folder)["losses/td_loss"]]
    assert [s for s in losses if s >= 400][0] > 400 + 300  # the empty buffer refills for --learning-starts steps
    assert read_scalars(folder)["injection/count"] == [(900, 1.0)]


def test_tracked_run_resumes_the_same_wandb_run(tmp_cwd):
    script = "iql_pointmass_injection"
    flags = [*IQL.split(), "--online-steps", "600", "--no-cuda", "--track", "--exp-name", "tracked"]
    assert run_script(script, *flags, cwd=tmp_cwd).returncode == 0
    checkpoint = sorted(glob.glob(os.path.join(run_dir(tmp_cwd, "tracked"), "checkpoints", "*.pt")))[0]
    unfinish(run_dir(tmp_cwd, "tracked"))
    assert run_script(script, *flags, "--resume", checkpoint, cwd=tmp_cwd).returncode == 0
    ids = {os.path.basename(p).rsplit("-", 1)[1] for p in glob.glob(str(tmp_cwd / "wandb" / "offline-run-*"))}
    assert len(glob.glob(str(tmp_cwd / "wandb" / "offline-run-*"))) == 2 and len(ids) == 1


def test_report_reads_a_resumed_run_as_tensorboard_does(tmp_path):
    """benchmark/report.py honours the purge a resume writes: what the stopped run logged from the checkpoint's step
    on is hidden, for every tag, exactly as TensorBoard's own reader hides it."""
    from torch.utils.tensorboard import SummaryWriter

    report = load_script("report", "benchmark")
    stopped = SummaryWriter(str(tmp_path))
    for step in range(10):
        stopped.add_scalar("a", step, step)
        stopped.add_scalar("b", -step, step)
    stopped.close()
    time.sleep(1.1)  # the resumed run's event file sorts after the stopped run's
    resumed = SummaryWriter(str(tmp_path), purge_step=6)
    for step in range(6, 8):
        resumed.add_scalar("a", 100 + step, step)
    resumed.close()
    ours, _ = report.read_scalars(tmp_path, ["a", "b"])
    theirs = read_scalars(tmp_path)
    assert ours["a"] == {s: float(v) for s, v in theirs["a"]} == {**{s: s for s in range(6)}, 6: 106, 7: 107}
    assert ours["b"] == {s: float(v) for s, v in theirs["b"]} == {s: -s for s in range(6)}


def test_a_longer_ppo_run_may_resume_with_resume_allow_changes(tmp_path, monkeypatch):
    """PPO's rollout count follows --total-timesteps: a longer run resumes (with the flag), a shorter one is refused."""
    monkeypatch.chdir(tmp_path)
    P = load_script("ppo_atari_injection")
    flags = dict(env_id="BreakoutNoFrameskip-v4", num_envs=2, num_steps=32, cuda=False, exp_name="r")
    saved = P.Args(total_timesteps=256, **flags)
    P.validate_args(saved)
    path = tmp_path / "runs" / "r" / "checkpoints" / "step_000000000128.pt"
    path.parent.mkdir(parents=True)
    torch.save({"script": "ppo_atari_injection.py", "log_step": 129, "global_step": 128, "args": vars(saved)}, path)
    for total, allow, says in ((512, True, None), (512, False, "--resume-allow-changes"), (128, True, "only grow")):
        args = P.Args(total_timesteps=total, resume="runs/r", resume_allow_changes=allow, **flags)
        P.validate_args(args)
        try:
            if says is None:
                assert P.find_checkpoint(args, "ppo_atari_injection.py")["global_step"] == 128
            else:
                with pytest.raises(P.UserError, match=says):
                    P.find_checkpoint(args, "ppo_atari_injection.py")
        finally:
            if P.RUN["lock"] is not None:
                os.close(P.RUN["lock"])
            P.RUN.update(lock=None, dir=None)
