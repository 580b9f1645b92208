"""Checkpoints and resume: a run killed (SIGKILL), interrupted (Ctrl-C) or preempted (SIGTERM) continues with
`--resume auto`; on CPU DQN (CartPole) and IQL continue exactly, across an injection. PPO's Atari games cannot be
saved (ale-py), so a resumed PPO run starts new games: what it restores is checked exactly instead."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, load_blocks, read_scalars, run_script

DQN = "--env-id CartPole-v1 --total-timesteps 6000 --learning-starts 500 --buffer-size 2000 --inject-at 3500 "
DQN += "--metrics-every 500 --eval-every 0 --eval-episodes 2 --checkpoint-every 1000 --keep-checkpoints 20"
IQL = "--offline-steps 1500 --online-steps 3000 --inject-at 2500 --dataset-steps 2000 --eval-every 1000 "
IQL += "--eval-episodes 3 --metrics-every 500 --checkpoint-every 500 --keep-checkpoints 20 --dataset-dir datasets"
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


@pytest.mark.parametrize("script", ["dqn_atari_injection", "iql_pointmass_injection"])
def test_sigkill_then_resume_auto_continues_exactly_across_an_injection(tmp_cwd, script):
    finish(script, "whole", tmp_cwd)
    proc = start(script, "killed", tmp_cwd)
    stop_after_first_checkpoint(proc, tmp_cwd, "killed", signal.SIGKILL)
    proc.wait(timeout=60)
    killed = run_dir(tmp_cwd, "killed")
    first = sorted(glob.glob(os.path.join(killed, "checkpoints", "step_*.pt")))[0]
    inject_at = int(RUNS[script].split("--inject-at ")[1].split()[0])
    assert int(first.rsplit("_", 1)[1][:-3]) < inject_at  # the resumed part crosses the injection
    proc = finish(script, "killed", tmp_cwd, "--resume", "auto")
    assert "resuming" in proc.stdout
    assert_same_run(run_dir(tmp_cwd, "whole"), killed)
    assert not glob.glob(os.path.join(killed, "**", ".tmp-*"), recursive=True)


@pytest.mark.parametrize("script, step", [("dqn_atari_injection", 4000), ("iql_pointmass_injection", 3000)])
def test_resuming_after_an_injection_reproduces_the_rest_of_the_run(tmp_cwd, script, step):
    """Back to a checkpoint written after the injection: the injected network, its optimizer and the rest continue
    as they did; the run folder ends up with the same logs and model as before."""
    finish(script, "run", tmp_cwd)
    folder = run_dir(tmp_cwd, "run")
    before, weights = read_scalars(folder), model(folder)
    assert before["injection/count"][0][0] < step
    finish(script, "run", tmp_cwd, "--resume", os.path.join(folder, "checkpoints", f"step_{step:012d}.pt"))
    after = read_scalars(folder)
    for key in before:
        if key not in TIMING:
            assert after[key] == before[key], key
    assert all(torch.equal(v, model(folder)[k]) for k, v in weights.items())


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
    assert a["optimizer"]["params"] == b["optimizer"]["params"] and a["history"]["games"] == b["history"]["games"]
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
    folder = os.path.relpath(os.path.join(run_dir(tmp_cwd, "run"), "checkpoints"), tmp_cwd)
    *_, previous, newest = sorted(glob.glob(os.path.join(folder, "step_*.pt")))
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    proc = run_script(script, *DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", "auto", cwd=tmp_cwd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert newest in proc.stderr and "truncated or corrupt" in proc.stderr and f"--resume {previous}" in proc.stderr
    proc = run_script(script, *DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", previous, cwd=tmp_cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_resume_refuses_changed_settings_unless_allowed_and_rejects_bad_paths(tmp_cwd):
    script = "dqn_atari_injection"
    finish(script, "run", tmp_cwd)
    flags = [*DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", "auto", "--learning-rate", "0.01"]
    proc = run_script(script, *flags, cwd=tmp_cwd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--learning-rate 0.0001 (now 0.01)" in proc.stderr and "--resume-allow-changes" in proc.stderr
    proc = run_script(script, *flags, "--resume-allow-changes", cwd=tmp_cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for bad, says in (("missing.pt", "no such file or folder"), (".", "no checkpoint")):
        proc = run_script(script, *DQN.split(), "--no-cuda", "--resume", bad, cwd=tmp_cwd)
        assert proc.returncode == 1 and says in proc.stderr and "Traceback" not in proc.stderr
    other = sorted(glob.glob(os.path.join(run_dir(tmp_cwd, "run"), "checkpoints", "*.pt")))[-1]
    proc = run_script("iql_pointmass_injection", "--no-cuda", "--resume", other, cwd=tmp_cwd)
    assert proc.returncode == 1 and "not a checkpoint of iql_pointmass_injection.py" in proc.stderr
    old = torch.load(other, weights_only=False)
    del old["log_time"]  # as written before resumes rewrote the event files
    torch.save(old, other)
    proc = run_script(script, *DQN.split(), "--no-cuda", "--exp-name", "run", "--resume", other, cwd=tmp_cwd)
    assert proc.returncode == 1 and "written by an older version" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoints_keep_the_newest_k_and_never_save_non_finite_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = load_blocks()
    args = type("A", (), {"checkpoint_every": 100})()
    assert [s for s in range(0, 1000, 32) if blocks.checkpoint_due(args, s, max(s - 32, 0))] == [
        s for s in range(32, 1000, 32) if s // 100 > (s - 32) // 100
    ]
    net = torch.nn.Linear(2, 2)
    for step in (100, 200, 300):
        blocks.save_checkpoint({"script": "x"}, "r", step, 2, {"net": net})
    assert [os.path.basename(p) for p in blocks.checkpoint_paths("runs/r/checkpoints")] == [
        "step_000000000200.pt",
        "step_000000000300.pt",
    ]
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(blocks.UserError, match=r"net has non-finite weights \(weight\) at global step 400; the last "):
        blocks.save_checkpoint({"script": "x"}, "r", 400, 2, {"net": net})
    assert len(blocks.checkpoint_paths("runs/r/checkpoints")) == 2
    with pytest.raises(blocks.UserError, match="non-finite .* the last good checkpoint is runs/r/checkpoints/step_"):
        blocks.check_finite(torch.tensor(float("inf")), "losses/td_loss", 401)


def test_a_failed_save_names_the_file_and_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = load_blocks()
    blocks.save_checkpoint({"script": "x"}, "r", 100, 2, {"net": torch.nn.Linear(2, 2)})
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
    assert torch.load(checkpoint, weights_only=False)["buffer"] is None
    proc = run_script(script, *flags, "--resume", checkpoint, cwd=tmp_cwd)  # back to step 400, in the same folder
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [step for step, _ in read_scalars(folder)["losses/td_loss"]]
    assert [s for s in losses if s >= 400][0] > 400 + 300  # the empty buffer refills for --learning-starts steps
    assert read_scalars(folder)["injection/count"] == [(900, 1.0)]


def test_tracked_run_resumes_the_same_wandb_run(tmp_cwd):
    script = "iql_pointmass_injection"
    flags = [*IQL.split(), "--online-steps", "1500", "--no-cuda", "--track", "--exp-name", "tracked"]
    assert run_script(script, *flags, cwd=tmp_cwd).returncode == 0
    checkpoint = sorted(glob.glob(os.path.join(run_dir(tmp_cwd, "tracked"), "checkpoints", "*.pt")))[0]
    assert run_script(script, *flags, "--resume", checkpoint, cwd=tmp_cwd).returncode == 0
    ids = {os.path.basename(p).rsplit("-", 1)[1] for p in glob.glob(str(tmp_cwd / "wandb" / "offline-run-*"))}
    assert len(glob.glob(str(tmp_cwd / "wandb" / "offline-run-*"))) == 2 and len(ids) == 1
