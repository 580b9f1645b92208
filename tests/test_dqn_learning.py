"""dqn_atari_injection.py end to end: DQN learns CartPole (with and without an injection midway), and a
real Atari game runs with an injection, evaluation, saving and TensorBoard logging."""

import glob
import os

import pytest
import torch
from conftest import load_script, read_scalars, run_script

dqn = load_script("dqn_atari_injection")

# Measured on the 2-core CPU machine: final greedy return 170-278 over seeds 1-4, with and without an
# injection at step 5000 (8/8 runs >= 150); see the README section of this script.
CARTPOLE = dict(
    env_id="CartPole-v1",
    total_timesteps=10000,
    learning_starts=1000,
    buffer_size=10000,
    learning_rate=1e-3,
    target_network_frequency=500,
    batch_size=64,
    train_frequency=4,
    exploration_fraction=0.2,
    end_e=0.05,
    eval_every=2500,
    eval_episodes=10,
    cuda=False,
    seed=1,
)


@pytest.mark.parametrize("inject_at", [[], [5000]], ids=["plain", "injected"])
def test_dqn_learns_cartpole(inject_at, tmp_cwd):
    out = dqn.train(dqn.Args(**CARTPOLE, inject_at=inject_at))
    assert out["eval/episodic_return"] >= 150, out["eval_returns"]
    assert len(out["eval_returns"]) == 10
    assert out["global_step"] == CARTPOLE["total_timesteps"]
    if inject_at:
        (inj,) = out["injections"]
        assert inj["global_step"] == 5000 and inj["injection/output_change"] == 0.0
        assert inj["injection/target_output_change"] == 0.0
        assert inj["injection/trainable_params"] == inj["injection/trainable_params_before"]


def test_atari_smoke_run_with_injection(tmp_cwd):
    proc = run_script(
        "dqn_atari_injection",
        "--env-id",
        "PhoenixNoFrameskip-v4",
        "--total-timesteps",
        600,
        "--learning-starts",
        200,
        "--buffer-size",
        1000,
        "--num-envs",
        2,
        "--target-network-frequency",
        100,
        "--inject-at",
        300,
        401,
        "--eval-every",
        300,
        "--eval-episodes",
        2,
        "--max-episode-frames",
        800,
        "--save-model",
        "--capture-video",
        "--no-cuda",
        cwd=tmp_cwd,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "warning" not in proc.stdout
    (run_dir,) = glob.glob("runs/PhoenixNoFrameskip-v4__dqn_atari_injection__1__*")
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    scalars = read_scalars(run_dir)
    assert scalars["injection/count"] == [(300, 1.0), (401, 2.0)]
    assert [v for _, v in scalars["injection/output_change"]] == [0.0, 0.0]
    assert [v for _, v in scalars["injection/target_output_change"]] == [0.0, 0.0]
    for key in (
        "charts/episodic_return",
        "charts/episodic_length",
        "charts/epsilon",
        "charts/SPS",
        "losses/td_loss",
        "losses/q_values",
    ):
        assert scalars.get(key), key
    assert [s for s, _ in scalars["eval/episodic_return"]] == [300, 600]
    # raw game scores: Phoenix scores come in multiples of 20, never clipped to [-1, 1]
    returns = [v for _, v in scalars["charts/episodic_return"]]
    assert any(v > 1 for v in returns) and all(v % 10 == 0 for v in returns), returns
    assert len(glob.glob(f"videos/{os.path.basename(run_dir)}/*.mp4")) == 2
    net = dqn.load_model(os.path.join(run_dir, "dqn_atari_injection.cleanrl_model"))
    assert isinstance(net.net[1], dqn.InjectedModule) and int(net.net[1].injection_count) == 2
    with torch.no_grad():
        assert net(torch.zeros(3, 4, 84, 84, dtype=torch.uint8)).shape == (3, 8)
