"""ppo_atari_injection end to end: reproducibility, and saved models that reload with load_injected_state_dict.
(The smoke run from an SB3 zip and the bad-input checks live in test_ppo_sb3.py, next to the zip fixture.)"""

import os

import pytest
import torch
from conftest import load_script, run_script

P = load_script("ppo_atari_injection")


def test_same_seed_same_numbers(tmp_cwd):
    args = dict(
        num_envs=2,
        num_steps=16,
        num_minibatches=2,
        update_epochs=2,
        total_timesteps=96,
        cuda=False,
        inject_at=[32],
        inject_target="all",
        seed=7,
    )
    a = P.train(P.Args(**args))
    b = P.train(P.Args(**args))
    c = P.train(P.Args(**dict(args, seed=8)))
    assert a["losses"] == b["losses"]
    for p, q in zip(a["agent"].state_dict().values(), b["agent"].state_dict().values()):
        assert torch.equal(p, q)
    assert a["losses"] != c["losses"]


def test_saved_model_reloads_with_the_same_function(tmp_cwd):
    out = P.train(
        P.Args(
            num_envs=2,
            num_steps=16,
            num_minibatches=2,
            update_epochs=1,
            total_timesteps=96,
            cuda=False,
            inject_at=[0, 64],
            inject_target="heads",
            save_model=True,
            share_features_extractor=False,
        )
    )
    ckpt = torch.load(out["model_path"], weights_only=False)
    agent = P.Agent(ckpt["n_actions"], ckpt["share_features_extractor"])
    P.load_injected_state_dict(agent, ckpt["model"])
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(agent(obs), out["agent"](obs))
    assert [p.requires_grad for p in agent.parameters()] == [p.requires_grad for p in out["agent"].parameters()]
    counts = {n: int(m.injection_count) for n, m in agent.named_modules() if isinstance(m, P.InjectedModule)}
    assert counts == {"policy.action_net": 2, "policy.value_net": 2}
    assert not [f for f in os.listdir(os.path.dirname(out["model_path"])) if f.startswith(".tmp-")]


def test_plasticity_metrics_are_logged_and_do_not_change_training(tmp_cwd):
    args = dict(
        num_envs=2,
        num_steps=16,
        num_minibatches=2,
        update_epochs=1,
        total_timesteps=96,
        cuda=False,
        inject_at=[32],
        inject_target="encoder",
        seed=5,
    )
    plain = P.train(P.Args(**args))
    measured = P.train(P.Args(**args, metrics_every=32, metrics_batch_size=16))
    assert plain["losses"] == measured["losses"]
    for p, q in zip(plain["agent"].parameters(), measured["agent"].parameters()):
        assert torch.equal(p, q)
    m = measured["metrics"]
    # after the injection both the trainable copy and the frozen terms are measured, and labelled
    assert any(k.startswith("plasticity/trainable/policy.features_extractor.terms.1.") for k in m)
    assert any(k.startswith("plasticity/frozen/policy.features_extractor.terms.0.") for k in m)
    assert 0.0 <= m["plasticity/dormant_ratio_mean"] <= 1.0 and m["plasticity/grad_norm"] > 0


def test_interventions_adaptive_trigger_and_reload(tmp_cwd):
    """Reset, shrink-and-perturb, L2, LayerNorm + LeakyReLU and an adaptive injection in one tiny run;
    the saved model (with its norms, activation and injection) reloads to the same function."""
    out = P.train(
        P.Args(
            num_envs=2,
            num_steps=16,
            num_minibatches=2,
            update_epochs=1,
            total_timesteps=160,
            cuda=False,
            metrics_every=32,
            metrics_batch_size=16,
            reset_at=[64],
            reset_target="heads",
            shrink_perturb_at=[96],
            l2_schedule="constant",
            l2_coef=1e-3,
            layer_norm=True,
            activation="leaky_relu",
            adaptive_inject_metric="plasticity/dormant_ratio_mean",
            adaptive_inject_threshold=-1.0,
            adaptive_inject_direction="above",
            save_model=True,
        )
    )
    assert [i["global_step"] for i in out["injections"]] == [32]  # fired once (max count 1), at the next boundary
    assert out["injections"][0]["injection/adaptive"] == 1.0 and out["injections"][0]["injection/output_change"] == 0.0
    assert [(i["kind"], i["global_step"]) for i in out["interventions"]] == [("reset", 64), ("shrink_perturb", 96)]
    assert out["interventions"][0]["interventions/reset_params"] == 512 * 4 + 4 + 512 + 1
    ckpt = torch.load(out["model_path"], weights_only=False)
    assert ckpt["agent_config"]["layer_norm"] and ckpt["agent_config"]["activation"] == "leaky_relu"
    assert ckpt["adaptive_trigger"]["fired"] == [32]
    agent = P.Agent(**ckpt["agent_config"])
    P.load_injected_state_dict(agent, ckpt["model"])
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in agent.modules())
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(agent(obs), out["agent"](obs))


def test_intervention_flags_are_checked_before_the_run(tmp_cwd):
    bad = [
        (dict(layer_norm=True, pretrained="x.zip"), "--layer-norm"),
        (
            dict(adaptive_inject_metric="plasticity/nope", adaptive_inject_threshold=1.0, metrics_every=1024),
            "--adaptive-inject-metric",
        ),
        (
            dict(
                adaptive_inject_metric="plasticity/erank_features_mean", adaptive_inject_threshold=1.0, metrics_every=0
            ),
            "--metrics-every",
        ),
        (dict(reset_at=[10**9]), "--reset-at"),
        (dict(shrink_perturb_at=[5], total_timesteps=1024), "--shrink-perturb-at"),
        (dict(sp_perturb=-1.0), "--sp-perturb"),
    ]
    for kw, flag in bad:
        try:
            P.validate_args(P.Args(**kw))
        except P.UserError as e:
            assert flag in str(e), (kw, str(e))
        else:
            raise AssertionError(f"{kw} was accepted")
    assert not (tmp_cwd / "runs").exists()


def test_choices_are_checked_by_tyro(tmp_cwd):
    proc = run_script("ppo_atari_injection", "--inject-target", "head", "--no-cuda", cwd=tmp_cwd)
    assert proc.returncode != 0 and "--inject-target" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_cwd / "runs").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--learning-rate", "-1"],
        ["--learning-rate", "nan"],
        ["--gamma", "1.5"],
        ["--gae-lambda", "-0.1"],
        ["--clip-coef", "-0.1"],
        ["--ent-coef", "-1"],
        ["--vf-coef", "inf"],
        ["--max-grad-norm", "0"],
        ["--target-kl", "0"],
        ["--num-envs", "0"],
        ["--max-episode-frames", "0"],
    ],
)
def test_out_of_range_values_get_one_line_naming_the_flag(tmp_cwd, flags):
    proc = run_script("ppo_atari_injection", *flags, "--no-cuda", cwd=tmp_cwd)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {flags[0]} ")
    assert not (tmp_cwd / "runs").exists()
