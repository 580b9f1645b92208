"""The continual mode of the vector-observation DQN (--task-switch-every) and ReDo (--redo-every) in the scripts."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from conftest import ROOT, load_script, read_scalars, run_script

D = load_script("dqn_atari_injection")
TINY = dict(env_id="CartPole-v1", total_timesteps=3000, learning_starts=300, buffer_size=1000, batch_size=32)
TINY.update(eval_episodes=0, metrics_every=0, cuda=False, target_network_frequency=100)


def tasks(env_id: str, seed: int, permute_actions: bool, count: int = 4) -> list:
    return [D.PermutedTask(gym.make(env_id), seed, k, permute_actions) for k in range(count)]


@pytest.mark.parametrize("env_id", ["CartPole-v1", "LunarLander-v3"])
def test_every_task_is_a_valid_env_that_renames_the_same_mdp(env_id):
    for k, env in enumerate(tasks(env_id, seed=3, permute_actions=True)):
        raw = gym.make(env_id)
        n = raw.observation_space.shape[0]
        assert sorted(env.order) == list(range(n)) and set(np.abs(env.signs)) == {1.0}
        assert sorted(env.actions) == list(range(raw.action_space.n))
        assert (k == 0) == (list(env.order) == list(range(n)) and (env.signs == 1).all())
        obs, _ = env.reset(seed=5)
        raw_obs, _ = raw.reset(seed=5)
        rng = np.random.default_rng(0)
        for _ in range(30):  # the same game seen through the task's renaming, every observation inside its space
            assert env.observation_space.contains(obs), (k, obs)
            np.testing.assert_array_equal(obs, (raw_obs[env.order] * env.signs).astype(np.float32))
            action = int(rng.integers(raw.action_space.n))
            obs, reward, term, trunc, _ = env.step(action)
            raw_obs, raw_reward, raw_term, raw_trunc, _ = raw.step(int(env.actions[action]))
            assert (reward, term, trunc) == (raw_reward, raw_term, raw_trunc)
            if term or trunc:
                break


def test_the_same_seed_gives_the_same_tasks_and_another_seed_others():
    a, b, c = (tasks("LunarLander-v3", seed, True) for seed in (1, 1, 2))
    for x, y in zip(a, b):
        assert (x.order == y.order).all() and (x.signs == y.signs).all() and (x.actions == y.actions).all()
    assert any((x.order != z.order).any() or (x.signs != z.signs).any() for x, z in zip(a[1:], c[1:]))
    assert all((t.actions == np.arange(4)).all() for t in tasks("LunarLander-v3", 1, permute_actions=False))


def test_switches_happen_at_the_right_steps_and_are_logged(tmp_cwd):
    args = D.Args(**TINY, task_switch_every=1000, exp_name="switch")
    summary = D.train(args)
    tasks_logged = read_scalars(summary["run_dir"])["charts/task"]
    assert {int(v) for _, v in tasks_logged} == {0, 1, 2}
    assert all(int(v) == step // 1000 for step, v in tasks_logged)
    losses = [step for step, _ in read_scalars(summary["run_dir"])["losses/td_loss"]]
    for switch in (1000, 2000):  # an empty buffer: learning again after --learning-starts steps of the task
        assert not [s for s in losses if switch <= s <= switch + 300] and [s for s in losses if s > switch + 300]
    returns = read_scalars(summary["run_dir"])["charts/episodic_return"]
    assert [s for s, _ in returns] == [s for s, _ in tasks_logged]  # one task value per episode


def test_off_changes_nothing_and_atari_is_refused(tmp_cwd):
    plain = D.train(D.Args(**TINY, exp_name="plain"))
    long_tasks = D.train(D.Args(**TINY, task_switch_every=3000, exp_name="one_task"))  # task 0 all along
    assert (
        plain["train_returns"] == long_tasks["train_returns"]
        and plain["losses/td_loss"] == long_tasks["losses/td_loss"]
    )
    assert "charts/task" not in read_scalars(plain["run_dir"])
    proc = run_script("dqn_atari_injection", "--env-id", "BreakoutNoFrameskip-v4", "--task-switch-every", "100")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --task-switch-every permutes observation features: not for the Atari game 'BreakoutNoFrameskip-v4'"
    ]


def test_redo_runs_in_every_script_at_its_steps(tmp_cwd):
    dqn = D.train(D.Args(**TINY, redo_every=1000, exp_name="redo"))
    assert [e["global_step"] for e in dqn["interventions"]] == [1000, 2000]
    assert all(e["kind"] == "redo" and e["interventions/redo_dormant_after"] <= e["interventions/redo_dormant_before"]
               for e in dqn["interventions"])  # fmt: skip
    iql_script = load_script("iql_pointmass_injection")
    args = dict(hidden_sizes=[16, 16], batch_size=16, dataset_kind="random", dataset_steps=200, offline_steps=100)
    args.update(online_steps=100, cuda=False, eval_every=200, eval_episodes=1, metrics_every=0, redo_every=50)
    iql = iql_script.train(iql_script.Args(**args))
    assert [e["global_step"] for e in iql["interventions"]] == [50, 100, 150]
    P = load_script("ppo_atari_injection")
    args = dict(env_id="BreakoutNoFrameskip-v4", num_envs=2, num_steps=16, total_timesteps=128, eval_every=0)
    ppo = P.train(P.Args(**args, metrics_every=0, redo_every=64, cuda=False))
    assert [e["global_step"] for e in ppo["interventions"]] == [64]  # at the first iteration boundary at 64
    assert ppo["interventions"][0]["interventions/redo_units"] >= 0


def test_continual_report_scores_each_task_from_the_runs(tmp_path):
    """Fake runs with known returns: the per-task means, the change from task 0 and the comparison are computed."""
    from torch.utils.tensorboard import SummaryWriter

    report = load_script("continual_report", "benchmark")
    for setup, later in (("no_intervention", 10.0), ("inject_each_switch", 30.0)):
        for seed in (1, 2, 3):
            writer = SummaryWriter(str(tmp_path / "runs" / f"CartPole-v1__{setup}__{seed}__100"))
            for step in range(0, 300, 10):  # tasks of 100 steps: task 0 scores 20 and 21 (seeds), later `later`
                writer.add_scalar("charts/episodic_return", (20.0 + step % 20 // 10 if step < 100 else later), step)
            writer.close()
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--task-steps", "100", "--out", str(out), "--reps", "200"]) == 0
    text = (out / "report.md").read_text()
    assert (
        "| no_intervention | 3 | 20.5 [20.5, 20.5] | 10.0 [10.0, 10.0] | 10.0 [10.0, 10.0] | -10.5 [-10.5, -10.5] |"
        in (text)
    )
    assert "| inject_each_switch | +20.0 [+20.0, +20.0] | 1.00 [1.00, 1.00] |" in text
    assert (out / "tasks.png").stat().st_size > 0
    before = sorted(p.name for p in out.iterdir())
    tool = [sys.executable, str(ROOT / "benchmark" / "continual_report.py"), str(tmp_path / "runs")]
    flags = ["--task-steps", "100", "--out", str(out), "--baseline", "nope"]
    proc = subprocess.run([*tool, *flags], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --baseline nope: no such setup (have: inject_each_switch, no_intervention)"
    ]
    assert sorted(p.name for p in out.iterdir()) == before
