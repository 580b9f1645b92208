"""ppo_atari_injection end to end: reproducibility, and saved models that reload with load_injected_state_dict.
(The smoke run from an SB3 zip and the bad-input checks live in test_ppo_sb3.py, next to the zip fixture.)"""
import os

import torch
from conftest import load_script

P = load_script("ppo_atari_injection")


def test_same_seed_same_numbers(tmp_cwd):
    args = dict(num_envs=2, num_steps=16, num_minibatches=2, update_epochs=2, total_timesteps=96, cuda=False,
                inject_at=[32], inject_target="all", seed=7)
    a = P.train(P.Args(**args))
    b = P.train(P.Args(**args))
    c = P.train(P.Args(**dict(args, seed=8)))
    assert a["losses"] == b["losses"]
    for p, q in zip(a["agent"].state_dict().values(), b["agent"].state_dict().values()):
        assert torch.equal(p, q)
    assert a["losses"] != c["losses"]


def test_saved_model_reloads_with_the_same_function(tmp_cwd):
    out = P.train(P.Args(num_envs=2, num_steps=16, num_minibatches=2, update_epochs=1, total_timesteps=96, cuda=False,
                         inject_at=[0, 64], inject_target="heads", save_model=True,
                         share_features_extractor=False))
    ckpt = torch.load(out["model_path"], weights_only=False)
    agent = P.Agent(ckpt["n_actions"], ckpt["share_features_extractor"])
    P.load_injected_state_dict(agent, ckpt["model"])
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(P.agent_output(agent, obs), P.agent_output(out["agent"], obs))
    assert [p.requires_grad for p in agent.parameters()] == [p.requires_grad for p in out["agent"].parameters()]
    assert P.injection_counts(agent) == {"policy.action_net": 2, "policy.value_net": 2}
    assert not [f for f in os.listdir(os.path.dirname(out["model_path"])) if f.startswith(".tmp-")]




def test_plasticity_metrics_are_logged_and_do_not_change_training(tmp_cwd):
    args = dict(num_envs=2, num_steps=16, num_minibatches=2, update_epochs=1, total_timesteps=96, cuda=False,
                inject_at=[32], inject_target="encoder", seed=5)
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
