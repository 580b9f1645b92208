"""iql_pointmass_injection.py with the shared interventions: resets, shrink-and-perturb, L2 on the Q
loss, LayerNorm / LeakyReLU networks and the adaptive injection trigger (function level and in real
tiny runs, CPU)."""

import copy
import glob

import numpy as np
import pytest
import torch
from conftest import injection_counts, load_script, run_script

m = load_script("iql_pointmass_injection")
NAME = "iql_pointmass_injection"
RUN = dict(
    hidden_sizes=[16, 16],
    batch_size=32,
    dataset_kind="random",
    dataset_steps=300,
    eval_episodes=1,
    offline_steps=40,
    online_steps=50,
    eval_every=1000,
    metrics_every=0,
    log_every=10,
    cuda=False,
    seed=3,
)


def _agent(**kw):
    base = dict(hidden_sizes=[16, 16], batch_size=32, seed=0, cuda=False)
    base.update(kw)
    args = m.Args(**base)
    torch.manual_seed(0)
    return args, m.IQLAgent(args, torch.device("cpu"))


def _buffer(n=300, seed=0):
    rng = np.random.default_rng(seed)
    data = dict(
        observations=rng.random((n, 2), dtype=np.float32),
        actions=rng.integers(0, 5, n),
        rewards=-np.ones(n, np.float32),
        next_observations=rng.random((n, 2), dtype=np.float32),
        terminals=(rng.random(n) < 0.05).astype(np.float32),
    )
    return m.ReplayBuffer(data, 0, torch.device("cpu")), rng


def _train(agent, rb, rng, steps):
    for _ in range(steps):
        agent.update(rb.sample(32, rng))


def _params(agent):
    return {
        f"{net}.{n}": p for net in ("qf", "qf_target", "vf", "actor") for n, p in getattr(agent, net).named_parameters()
    }


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# which online parameters each --reset-target must re-initialise (name prefixes), written out by hand
RESET_EXPECTED = {
    "q-head": ("qf.q1.head.", "qf.q2.head."),
    "q": ("qf.q1.", "qf.q2."),
    "qv-head": ("qf.q1.head.", "qf.q2.head.", "vf.head."),
    "qv": ("qf.", "vf."),
    "actor": ("actor.",),
    "all": ("qf.", "vf.", "actor."),
}


@pytest.mark.parametrize("target", sorted(RESET_EXPECTED))
def test_reset_changes_exactly_the_chosen_params_and_their_optimizer_state(target):
    args, agent = _agent()
    rb, rng = _buffer()
    _train(agent, rb, rng, 5)  # Adam state exists for every parameter; target critics lag the online ones
    before = {k: p.detach().clone() for k, p in _params(agent).items()}
    opt_of = {}
    for net, opt in (("qf", agent.q_opt), ("vf", agent.v_opt), ("actor", agent.a_opt)):
        for n, p in getattr(agent, net).named_parameters():
            opt_of[f"{net}.{n}"] = (opt, p)
    moments = {k: opt.state[p]["exp_avg"].clone() for k, (opt, p) in opt_of.items()}

    log = m.reset_networks(agent, target)

    now = _params(agent)
    chosen = {k for k in opt_of if k.startswith(RESET_EXPECTED[target])}
    assert chosen
    for k, p in now.items():
        if k in chosen:
            assert not torch.equal(p, before[k]), k
        elif k.startswith("qf_target.") and "qf." + k[len("qf_target.") :] in chosen:
            assert torch.equal(p, now["qf." + k[len("qf_target.") :]]), k  # mirrored: the same new values
            assert not torch.equal(p, before[k]), k
        else:
            assert torch.equal(p, before[k]), k
    for k, (opt, p) in opt_of.items():
        if k in chosen:
            assert p not in opt.state, k  # fresh Adam state for exactly the reset parameters
        else:
            assert torch.equal(opt.state[p]["exp_avg"], moments[k]), k
    assert log["interventions/reset_params"] == sum(now[k].numel() for k in chosen)
    _train(agent, rb, rng, 2)  # training goes on, and the reset parameters get a new Adam state
    assert all(p in opt.state for opt, p in opt_of.values())


def test_reset_of_injected_heads_touches_only_the_trainable_terms():
    args, agent = _agent()
    rb, rng = _buffer()
    probe = rb.sample(64, np.random.default_rng(1))[0]
    _train(agent, rb, rng, 3)
    m.inject_critics(agent, probe, agent.args)
    _train(agent, rb, rng, 3)
    frozen = {n: p.detach().clone() for n, p in agent.qf.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in agent.qf.named_parameters() if p.requires_grad}
    log = m.reset_networks(agent, "q-head")
    online = dict(agent.qf.named_parameters())
    target = dict(agent.qf_target.named_parameters())
    assert all(torch.equal(online[n], v) for n, v in frozen.items())
    for n, v in trainable.items():
        assert torch.equal(online[n], v) == (".head." not in n), n  # encoder kept, trainable head term reset
        if ".head." in n:
            assert torch.equal(target[n], online[n]), n
    assert log["interventions/reset_params"] == sum(v.numel() for n, v in trainable.items() if ".head." in n)


def test_shrink_perturb_identity_keeps_the_run_and_a_perturbation_changes_it(tmp_cwd):
    # one exp_name per run: runs started in the same second would otherwise share a run folder
    base = m.train(m.Args(exp_name="base", save_model=True, **RUN))
    same = m.train(
        m.Args(
            exp_name="same",
            save_model=True,
            shrink_perturb_at=[10, 45],
            shrink_perturb_target="all",
            sp_shrink=1.0,
            sp_perturb=0.0,
            **RUN,
        )
    )
    moved = m.train(
        m.Args(exp_name="moved", save_model=True, shrink_perturb_at=[10, 45], sp_shrink=0.8, sp_perturb=0.1, **RUN)
    )
    assert [
        (i["global_step"], i["kind"], i["interventions/shrink_perturb_rel_change"]) for i in same["interventions"]
    ] == [(10, "shrink_perturb", 0.0), (45, "shrink_perturb", 0.0)]
    assert all(i["interventions/shrink_perturb_rel_change"] > 0.05 for i in moved["interventions"])
    n_q = sum(p.numel() for p in m.IQLAgent(m.Args(hidden_sizes=[16, 16]), torch.device("cpu")).qf.parameters())
    assert moved["interventions"][0]["interventions/shrink_perturb_params"] == n_q  # default target: the twin Q
    sb, ss, sm = (torch.load(r["model_path"], weights_only=False)["model"] for r in (base, same, moved))
    for net in sb:
        for k in sb[net]:
            assert torch.equal(sb[net][k], ss[net][k]), (net, k)
    assert any(not torch.equal(sb["qf"][k], sm["qf"][k]) for k in sb["qf"])
    for k in ("losses/q_loss", "losses/v_loss", "losses/actor_loss"):
        assert base[k] == same[k], k
    assert base["losses/q_loss"] != moved["losses/q_loss"]
    tags = _scalars(moved["run_dir"])
    assert [s for s, _ in tags["interventions/shrink_perturb_rel_change"]] == [10, 45]


def test_reset_in_a_real_run_is_logged_and_changes_training(tmp_cwd):
    base = m.train(m.Args(exp_name="base", **RUN))
    out = m.train(m.Args(exp_name="reset", reset_at=[20, 60], reset_target="q-head", **RUN))
    assert [(i["global_step"], i["kind"], i["target"]) for i in out["interventions"]] == [
        (20, "reset", "q-head"),
        (60, "reset", "q-head"),
    ]
    head = m.IQLAgent(m.Args(hidden_sizes=[16, 16]), torch.device("cpu")).qf.q1.head
    assert out["interventions"][0]["interventions/reset_params"] == 2 * sum(p.numel() for p in head.parameters())
    assert _scalars(out["run_dir"])["interventions/reset_params"][0][0] == 20
    assert out["losses/q_loss"] != base["losses/q_loss"]


def test_l2_adds_the_penalty_to_the_q_loss_only():
    args, agent = _agent()
    rb, rng = _buffer()
    _train(agent, rb, rng, 3)
    twin = copy.deepcopy(agent)
    batch = rb.sample(32, np.random.default_rng(5))
    lam = 1e-2
    penalty = sum(float(p.detach().double().pow(2).sum()) for p in agent.qf.parameters() if p.dim() == 2)
    plain, reg = agent.update(batch), twin.update(batch, l2=lam)
    assert float(reg["losses/q_loss"] - plain["losses/q_loss"]) == pytest.approx(lam * penalty, rel=1e-4)
    for k in ("losses/v_loss", "losses/actor_loss"):
        assert torch.equal(plain[k], reg[k])
    for net in ("vf", "actor"):  # L2 is on the critics only
        for a, b in zip(getattr(agent, net).parameters(), getattr(twin, net).parameters()):
            assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(agent.qf.parameters(), twin.qf.parameters()))


def test_l2_schedule_is_logged_with_its_values_in_a_run(tmp_cwd):
    coef = 1e-3
    out = m.train(
        m.Args(exp_name="periodic", l2_schedule="periodic", l2_coef=coef, l2_period_on=20, l2_period_off=10, **RUN)
    )
    logged = _scalars(out["run_dir"])["losses/l2_coef"]
    steps = list(range(0, 90, 10)) + [89]  # every --log-every step and the last step
    assert [s for s, _ in logged] == steps
    for s, v in logged:
        assert v == pytest.approx(coef if s % 30 < 20 else 0.0), s
    inc = m.train(m.Args(exp_name="incremental", l2_schedule="incremental", l2_start=0.0, l2_end=9e-4, **RUN))
    for s, v in _scalars(inc["run_dir"])["losses/l2_coef"]:
        assert v == pytest.approx(9e-4 * s / 90), s
    assert "losses/l2_coef" not in _scalars(m.train(m.Args(exp_name="none", **RUN))["run_dir"])


def test_layer_norm_leaky_relu_networks_inject_without_output_change():
    args, agent = _agent(layer_norm=True, activation="leaky_relu")
    for net in (agent.qf, agent.vf, agent.actor):
        kinds = [type(mod) for mod in net.modules()]
        assert torch.nn.LayerNorm in kinds and torch.nn.LeakyReLU in kinds and torch.nn.ReLU not in kinds
        assert all(mod.negative_slope == 0.01 for mod in net.modules() if isinstance(mod, torch.nn.LeakyReLU))
    assert isinstance(agent.qf.q1.encoder[1], torch.nn.LayerNorm) and isinstance(
        agent.qf.q1.head[1], torch.nn.LayerNorm
    )
    rb, rng = _buffer()
    probe = rb.sample(64, np.random.default_rng(1))[0]
    _train(agent, rb, rng, 10)
    assert not torch.equal(agent.qf.q1.head[1].weight, torch.ones(16))  # the norm gains have trained
    for _ in range(2):  # double injection
        before, tbefore = agent.qf(probe), agent.qf_target(probe)
        log = m.inject_critics(agent, probe, agent.args)
        assert all(torch.equal(a, b) for a, b in zip(before, agent.qf(probe)))
        assert all(torch.equal(a, b) for a, b in zip(tbefore, agent.qf_target(probe)))
        assert log["injection/output_change"] == 0.0
        _train(agent, rb, rng, 3)
    m.reset_networks(agent, "q-head")  # the trainable head term's LayerNorm is back to its init
    assert torch.equal(agent.qf.q1.head.terms[-1][1].weight, torch.ones(16))


def test_adaptive_trigger_fires_respects_gap_and_max_count(tmp_cwd, capsys):
    kw = dict(RUN, metrics_every=20, save_model=True)
    out = m.train(
        m.Args(
            adaptive_inject_metric="plasticity/weight_magnitude_mean",
            adaptive_inject_threshold=0.0,
            adaptive_inject_direction="above",
            adaptive_inject_min_gap=30,
            adaptive_inject_max_count=2,
            **kw,
        )
    )
    # measurements at 0, 20, 40, 60, 80: fires at 0, 20 is too close (gap 30), 40 fires, then the count is spent
    assert [(i["global_step"], i["injection/adaptive"], i["injection/output_change"]) for i in out["injections"]] == [
        (0, 1.0, 0.0),
        (40, 1.0, 0.0),
    ]
    assert out["injection/count"] == 2 and out["injection/adaptive_count"] == 2
    printed = capsys.readouterr().out
    assert "adaptive: plasticity/weight_magnitude_mean=" in printed and "> 0 at step 40" in printed
    tags = _scalars(out["run_dir"])
    assert tags["injection/adaptive"] == [(0, 1.0), (40, 1.0)] and tags["injection/count"] == [(0, 1.0), (40, 2.0)]
    ckpt = torch.load(out["model_path"], weights_only=False)
    assert ckpt["adaptive_trigger"]["fired"] == [0, 40]
    agent = m.IQLAgent(m.Args(hidden_sizes=[16, 16]), torch.device("cpu"))
    m.load_injected_state_dict(agent.qf, ckpt["model"]["qf"])
    assert injection_counts(agent.qf) == {"q1.head": 2, "q2.head": 2}
    # a scheduled injection is logged as not adaptive; a threshold never crossed never fires
    quiet = m.train(
        m.Args(
            exp_name="quiet",
            inject_at=[30],
            adaptive_inject_metric="plasticity/weight_magnitude_mean",
            adaptive_inject_threshold=0.0,
            adaptive_inject_direction="below",
            **dict(kw, save_model=False),
        )
    )
    assert [(i["global_step"], i["injection/adaptive"]) for i in quiet["injections"]] == [(30, 0.0)]


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(reset_at=[90]), "--reset-at"),
        (dict(shrink_perturb_at=[-1]), "--shrink-perturb-at"),
        (dict(sp_perturb=float("nan")), "--sp-perturb"),
        (dict(l2_schedule="periodic", l2_period_on=0), "--l2-period-on"),
        (dict(adaptive_inject_threshold=1.0), "needs --adaptive-inject-metric"),
        (
            dict(
                adaptive_inject_metric="plasticity/erank_feature_mean", adaptive_inject_threshold=1.0, metrics_every=20
            ),
            "did you mean plasticity/erank_features_mean",
        ),
        (
            dict(adaptive_inject_metric="plasticity/grad_norm", adaptive_inject_threshold=1.0, metrics_every=0),
            "needs --metrics-every > 0",
        ),
    ],
)
def test_bad_intervention_settings_are_rejected_before_anything_is_written(tmp_cwd, kw, words):
    base = dict(RUN)
    base.update(kw)
    with pytest.raises(m.UserError, match=words):
        m.train(m.Args(**base))
    assert not (tmp_cwd / "runs").exists() and not (tmp_cwd / "datasets").exists()


def test_unknown_adaptive_metric_on_the_command_line_is_one_line(tmp_cwd):
    res = run_script(
        NAME,
        "--offline-steps",
        "5",
        "--online-steps",
        "0",
        "--adaptive-inject-metric",
        "plasticity/nope",
        "--adaptive-inject-threshold",
        "1",
        cwd=tmp_cwd,
    )
    assert res.returncode != 0
    assert "--adaptive-inject-metric 'plasticity/nope' is not a measured metric" in res.stderr
    assert "Traceback" not in res.stderr and not glob.glob(str(tmp_cwd / "runs" / "*"))
