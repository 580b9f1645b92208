"""benchmark/throughput.py: steps/s read from a run's TensorBoard events, warm-up excluded, real script runs and an
external command side by side."""

import importlib.util
import sys

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmark" / "throughput.py")
T = importlib.util.module_from_spec(spec)
spec.loader.exec_module(T)

# An "external implementation": logs charts/SPS every 100 steps, 1000 steps per second after a slow start.
FAKE = (
    "import time; from torch.utils.tensorboard import SummaryWriter; w = SummaryWriter('runs/fake'); "
    "time.sleep(0.5); [(w.add_scalar('charts/SPS', 0, s), w.flush(), time.sleep(0.1)) for s in range(0, 1100, 100)]; "
    "w.close()"
)


def test_steps_per_second_excludes_the_warm_up(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    # a slow start (step 0 -> 100 takes long), then exactly 100 steps per 0.25 s of wall time
    for step, wall in [(0, 0.0), (100, 50.0), (200, 50.25), (300, 50.5), (400, 50.75)]:
        w.add_scalar("charts/SPS", 1.0, step, walltime=wall)
    w.close()
    assert T.steps_per_second(str(tmp_path), warmup=0.25) == pytest.approx(400.0)  # from step 100 on
    assert T.steps_per_second(str(tmp_path), warmup=0.0) == pytest.approx(400 / 50.75)


def test_scale_budget():
    flags = ["--total-timesteps", "12000", "--learning-starts", "2000", "--seed", "3"]
    assert T.scale_budget(flags, 0.5) == ["--total-timesteps", "6000", "--learning-starts", "1000", "--seed", "3"]


def test_real_runs_and_an_external_command_side_by_side(capsys, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--scripts", "iql", "--only", "no injection", "inject q", "--repeats", "1", "--scale", "0.2"]
    assert T.main([*argv, "--external", f'fake={sys.executable} -c "{FAKE}"', "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line.split("|") for line in table.splitlines() if line.startswith("| ")}
    assert {"no injection", "inject q", "fake"} <= set(rows)
    assert float(rows["no injection"][5]) == 1.0  # the baseline row of its script
    fake_sps = float(rows["fake"][3])
    assert 400 < fake_sps < 1100  # 1000 steps/s minus the fake's own overhead; its slow start is left out
    assert "DQN replay memory" not in table
    assert out.exists()


def test_bad_input():
    assert T.main(["--repeats", "0"]) == 2
    assert T.main(["--scripts", "iql", "--only", "none", "--external", "nocommand"]) == 2


def test_dqn_update_levers_time_the_scripts_own_update(capsys):
    import copy

    import torch

    spec = importlib.util.spec_from_file_location("dqn_update_levers", ROOT / "benchmark" / "dqn_update_levers.py")
    L = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(L)
    D = L.load_dqn()
    torch.manual_seed(0)
    q = D.QNetwork((4, 84, 84), 4, atari=True)
    mine, target = copy.deepcopy(q), copy.deepcopy(q)
    obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    batch = (obs, torch.randint(0, 4, (8,)), torch.rand(8), torch.zeros(8), obs.flip(0))
    D.dqn_update(q, target, torch.optim.Adam(q.parameters(), lr=1e-4, foreach=True), batch, D.Args())
    L.update(mine, target, torch.optim.Adam(mine.parameters(), lr=1e-4, foreach=True), batch)
    assert all(torch.equal(a, b) for a, b in zip(q.parameters(), mine.parameters()))  # what the script computes
    assert L.main(["--steps", "2", "--repeats", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 5 and float(rows[0][4]) == 0.0 and all(float(r[2]) > 0 for r in rows)
    assert float(rows[4][4]) < 1e-3  # --compile: the same numbers within float tolerance


def test_injection_flops_count_what_the_scripts_compute(capsys):
    spec = importlib.util.spec_from_file_location("injection_flops", ROOT / "benchmark" / "injection_flops.py")
    F = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(F)
    # The Nature DQN network's multiply-adds per observation: three convolutions, then the head (3136 -> 512 -> 4).
    conv1, convs = 20 * 20 * 32 * (4 * 8 * 8), 20 * 20 * 32 * (4 * 8 * 8) + 9 * 9 * 64 * 512 + 7 * 7 * 64 * 576
    head = 3136 * 512 + 512 * 4
    macs, batch, actions = convs + head, 32, 4
    # One Double DQN update: Q(s) forward, the online and target forwards on s', the backward (weight gradients of
    # every layer, input gradients of all but the first); then --train-frequency one-observation action forwards.
    update = 2 * batch * (5 * macs - conv1) + actions * 2 * macs
    assert F.dqn_flops(F.load("dqn_atari_injection"), None) == update
    # Head injection: two more head terms in each of the four passes over the batch (forward of s, s' twice, input
    # gradients of the backward) and in every action forward; the frozen terms get no weight gradients.
    assert F.dqn_flops(F.load("dqn_atari_injection"), "head") == update + 2 * 2 * head * (4 * batch + actions)
    assert F.dqn_flops(F.load("dqn_atari_injection"), F.VANILLA) == update - 2 * batch * macs  # no online Q(s')
    rows = {(r[0], r[1]): r[3] for r in F.main(["--scripts", "ppo"])}
    assert rows[("ppo", "none")] == 1.0 and rows[("ppo", "heads")] > 0.999  # the heads are tiny
    # encoder injection: three encoders per rollout observation; the update epochs reuse the cached frozen outputs
    assert 0.8 < rows[("ppo", "encoder")] < 0.9 and rows[("ppo", "encoder, no frozen-output cache")] < 0.6
    assert "| ppo | encoder |" in capsys.readouterr().out
