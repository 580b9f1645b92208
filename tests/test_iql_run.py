"""End-to-end and command-line tests of iql_pointmass_injection.py (tiny budgets, CPU)."""

import dataclasses
import glob
import os

import numpy as np
import pytest
import torch
from conftest import injection_counts, load_script, run_script

m = load_script("iql_pointmass_injection")
NAME = "iql_pointmass_injection"
TINY = [
    "--hidden-sizes",
    "16",
    "16",
    "--batch-size",
    "32",
    "--dataset-kind",
    "random",
    "--dataset-steps",
    "300",
    "--eval-episodes",
    "2",
    "--no-cuda",
]


def test_end_to_end_offline_online_double_injection(tmp_cwd):
    res = run_script(
        NAME,
        *TINY,
        "--offline-steps",
        "60",
        "--online-steps",
        "150",
        "--eval-every",
        "100",
        "--inject-at",
        "50",
        "120",
        "--inject-target",
        "qv",
        "--save-model",
        cwd=tmp_cwd,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("injected plasticity") == 2
    assert "global_step=210, eval/episodic_return=" in res.stdout
    runs = glob.glob(str(tmp_cwd / "runs" / "PointmassHard-v0__*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "events.out.tfevents.*"))
    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(runs[0], "*.png")))
    assert pngs == ["eval_0000100.png", "eval_0000200.png", "eval_0000210.png"]
    with open(os.path.join(runs[0], pngs[0]), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert glob.glob(str(tmp_cwd / "datasets" / "PointmassHard-v0__random__300__*.npz"))
    # the TensorBoard log holds the cleanRL keys and the injection keys
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(runs[0])
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for key in (
        "eval/episodic_return",
        "eval/success_rate",
        "charts/episodic_return",
        "charts/SPS",
        "losses/q_loss",
        "losses/v_loss",
        "losses/actor_loss",
        "injection/count",
        "injection/output_change",
        "injection/trainable_params",
        "injection/v_output_change",
    ):
        assert key in tags, key
    assert [e.value for e in ea.Scalars("injection/count")] == [1.0, 2.0]
    assert [e.value for e in ea.Scalars("injection/output_change")] == [0.0, 0.0]
    # the saved model reloads into fresh networks with the same injected structure
    ckpt = torch.load(glob.glob(os.path.join(runs[0], "*.cleanrl_model"))[0], weights_only=False)
    assert ckpt["global_step"] == 210
    args = m.Args(hidden_sizes=[16, 16], inject_target="qv")
    agent = m.IQLAgent(args, torch.device("cpu"))
    m.load_injected_state_dict(agent.qf, ckpt["model"]["qf"])
    assert injection_counts(agent.qf) == {"q1.head": 2, "q2.head": 2}


def test_train_returns_final_metrics_and_is_seeded(tmp_cwd):
    kw = dict(
        hidden_sizes=[16, 16],
        batch_size=32,
        dataset_kind="rnd",
        dataset_steps=600,
        eval_episodes=2,
        offline_steps=40,
        online_steps=80,
        eval_every=60,
        inject_at=[50],
        cuda=False,
        save_model=True,
    )
    a = m.train(m.Args(seed=7, **kw))
    b = m.train(m.Args(seed=7, **kw))
    c = m.train(m.Args(seed=8, **kw))
    for key in ("eval/episodic_return", "eval/success_rate", "global_step", "losses/q_loss", "losses/actor_loss"):
        assert key in a
    assert a["global_step"] == 120 and -100 <= a["eval/episodic_return"] <= 0 and 0 <= a["eval/success_rate"] <= 1
    for key in ("losses/q_loss", "losses/v_loss", "losses/actor_loss", "eval/episodic_return"):
        assert a[key] == b[key], key
    sa, sb = torch.load(a["model_path"], weights_only=False), torch.load(b["model_path"], weights_only=False)
    for net in sa["model"]:
        for k in sa["model"][net]:
            assert torch.equal(sa["model"][net][k], sb["model"][net][k]), (net, k)
    assert a["losses/q_loss"] != c["losses/q_loss"]


def test_user_dataset_file_is_used(tmp_cwd):
    n = 200
    rng = np.random.default_rng(0)
    np.savez(
        "mine.npz",
        observations=rng.random((n, 2), dtype=np.float32),
        actions=rng.integers(0, 5, n),
        rewards=-np.ones(n, np.float32),
        next_observations=rng.random((n, 2), dtype=np.float32),
        terminals=np.zeros(n, bool),
    )
    out = m.train(
        m.Args(
            dataset="mine.npz",
            hidden_sizes=[8],
            batch_size=16,
            offline_steps=20,
            online_steps=0,
            eval_every=20,
            eval_episodes=1,
            cuda=False,
        )
    )
    assert out["global_step"] == 20 and out["dataset_goal_transitions"] == 0
    assert not os.path.exists("datasets")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--dataset", "nowhere.npz"], "--dataset nowhere.npz: no such file"),
        (["--dataset", "broken.npz"], "broken.npz"),
        (["--offline-steps", "10", "--online-steps", "10", "--inject-at", "20"], "--inject-at [20] is outside the run"),
        (["--env-id", "PointmassHuge-v0"], "--env-id 'PointmassHuge-v0' is unknown"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_cwd, flags, words):
    (tmp_cwd / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    res = run_script(NAME, *flags, cwd=tmp_cwd)
    assert res.returncode != 0
    assert words in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_cwd / "runs").exists() and not (tmp_cwd / "datasets").exists()


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(offline_steps=-1), "--offline-steps"),
        (dict(offline_steps=0, online_steps=0), "must be > 0"),
        (dict(inject_at=[3, 3]), "repeats"),
        (dict(inject_at=[-1]), "--inject-at"),
        (dict(expectile=1.0), "--expectile"),
        (dict(eval_episodes=0), "--eval-episodes"),
        (dict(critic_encoder_layers=3), "--critic-encoder-layers"),
        (dict(batch_size=0), "--batch-size"),
    ],
)
def test_bad_settings_are_rejected_before_anything_is_written(tmp_cwd, kw, words):
    base = dict(offline_steps=10, online_steps=10, hidden_sizes=[8, 8])
    base.update(kw)
    with pytest.raises(m.UserError, match=words.replace("[", r"\[")):
        m.train(m.Args(**base))
    assert not (tmp_cwd / "runs").exists() and not (tmp_cwd / "datasets").exists()


POISONS = {  # a non-finite value that reaches one loss alone: q through l2, v through the expectile, actor through beta
    "losses/q_loss": dict(l2=float("inf")),
    "losses/v_loss": dict(expectile=float("nan")),
    "losses/actor_loss": dict(beta=float("nan")),
}


def poison_update(monkeypatch, key: str, poisoned_call) -> list:
    """IQLAgent.update really computes a non-finite `key` loss (POISONS) on the calls that poisoned_call(n) picks
    (n counts from 1); returns the list that counts the calls."""
    real, calls = m.IQLAgent.update, []

    def poisoned(self, batch, **kw):
        calls.append(1)
        if not poisoned_call(len(calls)):
            return real(self, batch, **kw)
        flags, args = dict(POISONS[key]), self.args
        kw["l2"] = flags.pop("l2", kw.get("l2", 0.0))
        self.args = dataclasses.replace(args, **flags)
        try:
            return real(self, batch, **kw)
        finally:
            self.args = args

    monkeypatch.setattr(m.IQLAgent, "update", poisoned)
    return calls


def test_non_finite_loss_stops_with_a_clear_message(tmp_cwd, monkeypatch):
    poison_update(monkeypatch, "losses/v_loss", lambda n: n > 3)
    with pytest.raises(m.UserError, match="losses/v_loss became non-finite .* at global step 3"):
        m.train(
            m.Args(
                hidden_sizes=[8],
                batch_size=16,
                dataset_kind="random",
                dataset_steps=100,
                offline_steps=5,
                online_steps=0,
                cuda=False,
                log_every=1,
                metrics_every=0,
            )
        )
    # what was logged before the failure is flushed to disk, not lost with the run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_cwd / "runs").iterdir()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("losses/q_loss")] == [0, 1, 2]


def test_non_finite_loss_between_log_points_is_named_at_the_next_check(tmp_cwd, monkeypatch):
    """Offline, the losses are checked on the device without a host sync per update: a NaN at a step that logs
    nothing is still named with its own step, before the run evaluates, logs or saves anything after it."""
    calls = poison_update(monkeypatch, "losses/actor_loss", lambda n: n == 13)  # step 12 (NaN weights after it)
    args = dict(hidden_sizes=[8], batch_size=16, dataset_kind="random", dataset_steps=100, offline_steps=30)
    args.update(online_steps=0, cuda=False, log_every=20, eval_every=100, metrics_every=0, save_model=True)
    with pytest.raises(m.UserError, match=r"losses/actor_loss became non-finite \(nan\) at global step 12"):
        m.train(m.Args(**args))
    assert len(calls) == 21  # stopped at the next log point (step 20), before logging or evaluating it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_cwd / "runs").iterdir()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("losses/actor_loss")] == [0]
    assert "eval/episodic_return" not in acc.Tags()["scalars"] and not list(run_dir.glob("*.cleanrl_model"))


def test_non_finite_loss_names_the_last_checkpoint_which_still_resumes(tmp_cwd, monkeypatch):
    real = m.IQLAgent.update
    args = dict(hidden_sizes=[8], batch_size=16, dataset_steps=100, offline_steps=8, online_steps=8, cuda=False)
    args.update(dataset_kind="random", metrics_every=0, eval_every=100, eval_episodes=1, checkpoint_every=4)
    poison_update(monkeypatch, "losses/q_loss", lambda n: n == 11)
    with pytest.raises(m.UserError, match=r"q_loss became non-finite \(inf\) at global step 10; the last good ch") as e:
        m.train(m.Args(**args))
    last = str(e.value).split("the last good checkpoint is ")[1].split(";")[0]
    assert last.endswith("step_000000000008.pt") and os.path.isfile(last)
    monkeypatch.setattr(m.IQLAgent, "update", real)
    assert m.train(m.Args(**args, resume=last))["global_step"] == 16
