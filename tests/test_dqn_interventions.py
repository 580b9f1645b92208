"""dqn_atari_injection.py with the shared plasticity metrics and interventions: metrics on a fixed
probe batch, resets, shrink-and-perturb, L2, and the adaptive injection trigger."""

import glob

import pytest
import torch
from conftest import load_script, read_scalars

dqn = load_script("dqn_atari_injection")

BASE = dict(
    env_id="CartPole-v1",
    total_timesteps=2000,
    learning_starts=400,
    buffer_size=2000,
    batch_size=32,
    train_frequency=2,
    target_network_frequency=200,
    eval_every=0,
    eval_episodes=2,
    cuda=False,
    learning_rate=1e-3,
    seed=5,
)


def test_metrics_interventions_and_adaptive_trigger(tmp_cwd):
    out = dqn.train(
        dqn.Args(
            **BASE,
            metrics_every=400,
            reset_at=[1000],
            shrink_perturb_at=[1400],
            l2_schedule="constant",
            l2_coef=1e-4,
            adaptive_inject_metric="plasticity/weight_magnitude_mean",
            adaptive_inject_threshold=1e9,
            adaptive_inject_direction="below",
            adaptive_inject_max_count=1,
            save_model=True,
        )
    )
    # the trigger fires at the first measurement (400 = --learning-starts) and only once
    (inj,) = out["injections"]
    assert inj["global_step"] == 400 and inj["injection/adaptive"] == 1.0 and inj["injection/output_change"] == 0.0
    kinds = [(i["global_step"], i["kind"]) for i in out["interventions"]]
    assert kinds == [(1000, "reset"), (1400, "shrink_perturb")]
    assert torch.load(out["model_path"], weights_only=True)["adaptive_trigger"] == {"fired": [400]}
    net = dqn.load_model(out["model_path"])
    head = net.net[1]
    trainable_head = sum(p.numel() for p in head.terms[1].parameters())
    assert out["interventions"][0]["interventions/reset_params"] == trainable_head  # frozen terms are not reset
    assert out["interventions"][1]["interventions/shrink_perturb_rel_change"] > 0
    m = out["plasticity"]
    assert "plasticity/erank_features_mean" in m and "plasticity/frozen/weight_magnitude_mean" in m
    assert "plasticity/trainable/net.1.terms.1.0/dormant_ratio" in m
    s = read_scalars(out["run_dir"])
    assert [st for st, _ in s["plasticity/grad_norm"]] == [400, 800, 1200, 1600]
    assert s["losses/l2_coef"] and all(v == pytest.approx(1e-4) for _, v in s["losses/l2_coef"])
    assert s["injection/adaptive"] == [(400, 1.0)]


def test_metrics_do_not_change_training(tmp_cwd):
    a = dqn.train(dqn.Args(**BASE))
    b = dqn.train(dqn.Args(**BASE, metrics_every=300))
    assert b["plasticity"] and not a["plasticity"]
    assert a["train_returns"] == b["train_returns"] and a["losses/td_loss"] == b["losses/td_loss"]


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(
                adaptive_inject_metric="plasticity/erank_features_mean", adaptive_inject_threshold=1.0, metrics_every=0
            ),
            "--metrics-every",
        ),
        (
            dict(adaptive_inject_metric="plasticity/nope", adaptive_inject_threshold=1.0, metrics_every=100),
            "--adaptive-inject-metric",
        ),
        (dict(reset_at=[5000]), "--reset-at"),
        (dict(shrink_perturb_at=[-1]), "--shrink-perturb-at"),
        (dict(dormant_tau=2.0), "--dormant-tau"),
        (dict(metrics_every=-5), "--metrics-every"),
    ],
)
def test_bad_intervention_flags(kw, match, tmp_cwd):
    with pytest.raises(dqn.UserError, match=match):
        dqn.train(dqn.Args(**BASE, **kw))
    assert not glob.glob("runs/*")
