"""Plasticity injection into the IQL critics: exact output preservation, parameter counts, frozen
parameters through real IQL updates, target mirroring, ablations."""

import numpy as np
import torch

from conftest import count_params, injection_counts, load_script

m = load_script("iql_pointmass_injection")


def _agent(**kw):
    base = dict(hidden_sizes=[32, 32], batch_size=64, seed=0, cuda=False)
    base.update(kw)
    args = m.Args(**base)
    torch.manual_seed(0)
    return args, m.IQLAgent(args, torch.device("cpu"))


def _buffer(n=500, seed=0):
    rng = np.random.default_rng(seed)
    data = dict(
        observations=rng.random((n, 2), dtype=np.float32),
        actions=rng.integers(0, 5, n),
        rewards=-np.ones(n, np.float32),
        next_observations=rng.random((n, 2), dtype=np.float32),
        terminals=(rng.random(n) < 0.05).astype(np.float32),
    )
    data["rewards"][data["terminals"] == 1] = 0.0
    return m.ReplayBuffer(data, 0, torch.device("cpu")), rng


def _train(agent, rb, rng, steps, batch=64):
    for _ in range(steps):
        agent.update(rb.sample(batch, rng))


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_single_then_double_injection_preserves_outputs_and_counts():
    args, agent = _agent()
    rb, rng = _buffer()
    probe = rb.sample(128, np.random.default_rng(1))[0]
    _train(agent, rb, rng, 30)
    n_train = count_params(agent.qf, trainable_only=True)
    for k in (1, 2):
        before = agent.qf(probe)
        target_before = agent.qf_target(probe)
        log = m.inject_critics(agent, probe, agent.args)
        after = agent.qf(probe)
        for b, a in zip(before, after):
            assert torch.equal(b, a)
        for b, a in zip(target_before, agent.qf_target(probe)):
            assert torch.equal(b, a)
        assert log["injection/output_change"] == 0.0 and log["injection/target_output_change"] == 0.0
        assert count_params(agent.qf, trainable_only=True) == n_train
        assert log["injection/count"] == k
        assert injection_counts(agent.qf) == {"q1.head": k, "q2.head": k}
        assert injection_counts(agent.qf_target) == {"q1.head": k, "q2.head": k}
        # the optimizer holds exactly the trainable parameters
        opt_ids = {id(p) for g in agent.q_opt.param_groups for p in g["params"]}
        assert opt_ids == {id(p) for p in agent.qf.parameters() if p.requires_grad}
        # frozen parameters do not move through real IQL updates; trainable ones (head and encoder) do
        frozen, trainable = _frozen(agent.qf), _trainable(agent.qf)
        assert frozen and any(".encoder." in n for n in trainable)
        _train(agent, rb, rng, 25)
        for n, p in agent.qf.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n
        assert all(not torch.equal(dict(agent.qf.named_parameters())[n], v) for n, v in trainable.items())
    # the head's total size grew by two fresh copies per injection
    assert len(agent.qf.q1.head.terms) == 5


def test_target_critic_is_mirrored_with_the_same_fresh_values():
    args, agent = _agent()
    rb, rng = _buffer()
    probe = rb.sample(64, np.random.default_rng(1))[0]
    _train(agent, rb, rng, 20)
    agent.qf_target.load_state_dict(agent.qf.state_dict())  # synced
    m.inject_critics(agent, probe, agent.args)
    for a, b in zip(agent.qf(probe), agent.qf_target(probe)):
        assert torch.equal(a, b)
    sd, tsd = agent.qf.state_dict(), agent.qf_target.state_dict()
    assert sd.keys() == tsd.keys()
    for k in sd:
        assert torch.equal(sd[k], tsd[k]), k
    # the target's new terms are not trainable by anyone, and soft updates still pair the parameters
    assert not any(p.requires_grad for p in agent.qf_target.parameters())
    assert [n for n, _ in agent.qf.named_parameters()] == [n for n, _ in agent.qf_target.named_parameters()]
    new_target_term = agent.qf_target.q1.head.terms[1][0].weight.clone()
    _train(agent, rb, rng, 5)
    assert not torch.equal(agent.qf.q1.head.terms[1][0].weight, agent.qf_target.q1.head.terms[1][0].weight)
    assert not torch.equal(agent.qf_target.q1.head.terms[1][0].weight, new_target_term)  # the soft update follows


def test_value_injection_and_reload():
    args, agent = _agent(inject_target="qv")
    rb, rng = _buffer()
    probe = rb.sample(64, np.random.default_rng(1))[0]
    _train(agent, rb, rng, 10)
    v_before = agent.vf(probe)
    n_v = count_params(agent.vf, trainable_only=True)
    log = m.inject_critics(agent, probe, agent.args)
    assert torch.equal(agent.vf(probe), v_before)
    assert log["injection/v_output_change"] == 0.0 and count_params(agent.vf, trainable_only=True) == n_v
    _train(agent, rb, rng, 10)
    # a saved state dict rebuilds the same functions in a fresh, un-injected agent
    _, fresh = _agent(inject_target="qv", seed=5)
    m.load_injected_state_dict(fresh.qf, agent.qf.state_dict())
    m.load_injected_state_dict(fresh.vf, agent.vf.state_dict())
    for a, b in zip(agent.qf(probe), fresh.qf(probe)):
        assert torch.equal(a, b)
    assert torch.equal(agent.vf(probe), fresh.vf(probe))
    assert count_params(fresh.qf, True) == count_params(agent.qf, True)


def test_ablations_change_what_they_say():
    rb, rng = _buffer()
    probe = rb.sample(64, np.random.default_rng(1))[0]
    _, agent = _agent(inject_no_third_term=True)
    log = m.inject_critics(agent, probe, agent.args)
    assert log["injection/output_change"] > 0
    _, agent = _agent(inject_keep_trainable=True)
    n = count_params(agent.qf, True)
    m.inject_critics(agent, probe, agent.args)
    assert count_params(agent.qf, True) == 3 * count_params(agent.qf.q1.head.terms[0]) * 2 + (
        n - 2 * count_params(agent.qf.q1.head.terms[0])
    )
    _, agent = _agent(inject_reset_optimizer=True)
    _train(agent, rb, rng, 3)
    assert len(agent.q_opt.state) > 0
    m.inject_critics(agent, probe, agent.args)
    assert len(agent.q_opt.state) == 0
    _, agent = _agent()
    _train(agent, rb, rng, 3)
    enc = agent.qf.q1.encoder[0].weight
    moments = agent.q_opt.state[enc]["exp_avg"].clone()
    m.inject_critics(agent, probe, agent.args)
    assert torch.equal(agent.q_opt.state[enc]["exp_avg"], moments)  # Adam moments of the encoder kept


def test_whole_network_injection_without_encoder():
    _, agent = _agent(critic_encoder_layers=0)
    rb, rng = _buffer()
    probe = rb.sample(64, np.random.default_rng(1))[0]
    _train(agent, rb, rng, 5)
    before = agent.qf(probe)
    n = count_params(agent.qf, True)
    m.inject_critics(agent, probe, agent.args)
    m.inject_critics(agent, probe, agent.args)
    for a, b in zip(before, agent.qf(probe)):
        assert torch.equal(a, b)
    assert count_params(agent.qf, True) == n
    _train(agent, rb, rng, 3)


def test_plasticity_metrics_do_not_change_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = dict(
        hidden_sizes=[16, 16],
        batch_size=32,
        dataset_kind="random",
        dataset_steps=200,
        eval_episodes=1,
        offline_steps=30,
        online_steps=30,
        eval_every=60,
        inject_at=[30],
        cuda=False,
    )
    calls = []
    real = m.plasticity_metrics

    def spy(agent, batch, tau):
        out = real(agent, batch, tau)
        calls.append(out)
        return out

    monkeypatch.setattr(m, "plasticity_metrics", spy)
    with_metrics = m.train(m.Args(metrics_every=20, **kw))
    without = m.train(m.Args(metrics_every=0, **kw))
    assert len(calls) == 3  # steps 0, 20, 40
    assert "plasticity/erank_features_mean" in calls[0] and "plasticity/updated_units_pct_mean" in calls[0]
    assert any(k.startswith("plasticity/frozen/") for k in calls[-1])  # after the injection at 30
    for k in ("losses/q_loss", "losses/v_loss", "losses/actor_loss"):
        assert with_metrics[k] == without[k]
