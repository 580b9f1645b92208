"""Plasticity injection in ppo_atari_injection: exact desiderata, frozen terms through real PPO updates,
the frozen-output cache, and GAE over steps the agent did not decide."""

import copy

import numpy as np
import pytest
import torch
from conftest import load_script

P = load_script("ppo_atari_injection")
N_ACTIONS = 4


def _args(**kw):
    a = P.Args(num_minibatches=2, update_epochs=2, **kw)
    return a


def _batch(agent, n=48, seed=0):
    """A flat PPO batch on random uint8 frames, with old log-probs/values from the agent itself."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs)
    adv = torch.randn(n, generator=g)
    return {
        "obs": obs,
        "actions": actions,
        "logprobs": logprobs,
        "advantages": adv,
        "returns": values + adv,
        "values": values,
    }


def _trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _inject(agent, optimizer, args, probe):
    """The injection as train() calls it."""
    return P.intervene("inject", agent, optimizer, args, probe)


def _agent(share=True, seed=0):
    torch.manual_seed(seed)
    agent = P.Agent(N_ACTIONS, share)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    return agent, optimizer


CASES = [(t, n, True) for t in ("encoder", "heads", "all") for n in (1, 2)] + [
    ("encoder", 2, False),
    ("heads", 1, False),
]


@pytest.mark.parametrize("target,n_injections,share", CASES)
def test_injection_desiderata_through_ppo_updates(target, n_injections, share):
    agent, optimizer = _agent(share)
    args = _args(inject_target=target)
    probe = _batch(agent, 8, seed=1)["obs"]
    check = _batch(agent, 16, seed=2)["obs"]
    trainable0 = _trainable(agent)
    np.random.seed(0)
    for k in range(n_injections):
        P.ppo_update(agent, optimizer, _batch(agent, seed=10 + k), args)  # train before injecting
        with torch.no_grad():
            before = agent(check)
        log = _inject(agent, optimizer, args, probe)
        with torch.no_grad():
            after = agent(check)
        assert torch.equal(before, after), "output changed at injection"
        assert log["injection/output_change"] == 0.0 and log["injection/count"] == k + 1
        assert _trainable(agent) == trainable0
        # the optimizer holds exactly the trainable parameters
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert in_opt == {id(p) for p in agent.parameters() if p.requires_grad}

    paths = list(P.target_modules(agent, target))
    frozen = {n: p.detach().clone() for n, p in agent.named_parameters() if not p.requires_grad}
    assert frozen, "injection froze nothing"
    new_copy = {
        p: [{k: v.clone() for k, v in t.state_dict().items()} for t in agent.get_submodule(p).terms[-2:]] for p in paths
    }
    for k in range(2):  # real PPO updates (cache on for encoder/all)
        batch = _batch(agent, seed=20 + k)
        batch.update(agent.frozen_outputs(batch["obs"], P.cached_paths(agent, args)))  # as the rollout stores them
        stats = P.ppo_update(agent, optimizer, batch, args)
        assert np.isfinite(stats["losses/value_loss"])
    for n, p in agent.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    for path in paths:
        head = agent.get_submodule(path)
        assert int(head.injection_count) == n_injections and len(head.terms) == 1 + 2 * n_injections
        trained, frozen_copy = head.terms[-2], head.terms[-1]
        assert all(p.requires_grad for p in trained.parameters())
        assert not any(p.requires_grad for p in frozen_copy.parameters())
        moved = [not torch.equal(a, new_copy[path][0][k]) for k, a in trained.state_dict().items()]
        assert any(moved), f"the trainable copy at {path} did not move"
        assert all(torch.equal(a, new_copy[path][1][k]) for k, a in frozen_copy.state_dict().items())
    if target == "heads":  # the shared encoder keeps training
        enc = agent.policy.features_extractor if share else agent.policy.pi_features_extractor
        assert all(p.requires_grad for p in enc.parameters())


def test_fresh_copies_use_the_networks_init_scheme():
    agent, optimizer = _agent()
    _inject(agent, optimizer, _args(inject_target="heads"), _batch(agent, 4)["obs"])
    fresh_value = agent.policy.value_net.terms[1].weight
    fresh_action = agent.policy.action_net.terms[1].weight
    # orthogonal rows with gains 1 (value) and 0.01 (actions), zero biases, as at construction
    assert torch.allclose(fresh_value.norm(), torch.tensor(1.0), atol=1e-5)
    torch.testing.assert_close(fresh_action @ fresh_action.T, 1e-4 * torch.eye(N_ACTIONS), atol=1e-7, rtol=0)
    assert not torch.equal(fresh_value, agent.policy.value_net.terms[0].weight)


def test_ablations_change_the_structure():
    agent, optimizer = _agent()
    obs = _batch(agent, 8)["obs"]
    n0 = _trainable(agent)
    log = _inject(agent, optimizer, _args(inject_target="encoder", inject_no_third_term=True), obs)
    assert log["injection/output_change"] > 0 and len(agent.policy.features_extractor.terms) == 2
    agent, optimizer = _agent()
    encoder = sum(p.numel() for p in agent.policy.features_extractor.parameters())
    _inject(agent, optimizer, _args(inject_target="encoder", inject_keep_trainable=True), obs)
    assert _trainable(agent) == n0 + 2 * encoder
    agent, optimizer = _agent()
    P.ppo_update(agent, optimizer, _batch(agent), _args())
    assert optimizer.state
    _inject(agent, optimizer, _args(inject_target="heads", inject_reset_optimizer=True), obs)
    assert not optimizer.state


@pytest.mark.parametrize("target,share", [("encoder", True), ("encoder", False), ("all", True)])
def test_cached_frozen_outputs_give_the_same_losses_and_gradients(target, share):
    agent, optimizer = _agent(share)
    args = _args(inject_target=target)
    _inject(agent, optimizer, args, _batch(agent, 4)["obs"])
    P.ppo_update(agent, optimizer, _batch(agent, seed=3), args)  # new copy differs from the frozen one
    batch = _batch(agent, seed=4)
    paths = P.cached_paths(agent, args)
    assert paths
    cache = agent.frozen_outputs(batch["obs"], paths)
    assert cache and all(k.startswith("frozen/") and not o.requires_grad for k, o in cache.items())

    def loss_and_grads(cache):
        agent.zero_grad()
        _, logp, ent, value = agent.get_action_and_value(batch["obs"], batch["actions"], cache=cache)
        loss = -(logp * batch["advantages"]).mean() + ((value - batch["returns"]) ** 2).mean() - 0.01 * ent.mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in agent.named_parameters() if p.requires_grad}

    loss_a, grads_a = loss_and_grads(None)
    loss_b, grads_b = loss_and_grads(cache)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in agent.parameters() if not p.requires_grad)

    # whole updates agree too: the cache travels with the (mini)batch, and the frozen terms never run in the update
    twin, twin_opt = copy.deepcopy((agent, optimizer))  # one deepcopy: the optimizer points at the twin
    calls = []
    for path in paths:
        injected = agent.get_submodule(path)
        for term, trainable in zip(injected.terms, injected.term_trainable):
            if not trainable:
                term.register_forward_hook(lambda *a: calls.append(1))
    np.random.seed(5)
    stats_cached = P.ppo_update(agent, optimizer, dict(batch, **cache), args)
    assert calls == []
    np.random.seed(5)
    stats_plain = P.ppo_update(twin, twin_opt, batch, args)
    for k in stats_plain:
        assert stats_cached[k] == pytest.approx(stats_plain[k], rel=1e-4, abs=1e-6), k
    for p, q in zip(agent.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_heads_target_is_not_cached():
    agent, optimizer = _agent()
    _inject(agent, optimizer, _args(inject_target="heads"), _batch(agent, 4)["obs"])
    assert P.cached_paths(agent, _args(inject_target="heads")) == []
    assert P.cached_paths(agent, _args(inject_target="encoder", inject_cache_frozen=False)) == []


def test_gae_skips_steps_the_agent_did_not_decide():
    # one env, 5 steps: t=1 ends a life (terminated), t=2 is a forced step (invalid), t=3 is truncated
    # (game cut by the frame limit), t=4 is the autoreset step (invalid, obs = final obs)
    r = torch.tensor([[1.0], [1.0], [5.0], [1.0], [7.0]])
    v = torch.tensor([[0.5], [0.2], [9.0], [0.3], [0.8]])
    term = torch.tensor([[0.0], [1.0], [0.0], [0.0], [0.0]])
    valid = torch.tensor([[True], [True], [False], [True], [False]])
    nv, nvalid = torch.tensor([0.4]), torch.tensor([True])
    g, lam = 0.9, 0.5
    adv, ret = P.compute_gae(dict(rewards=r, values=v, terminated=term, valid=valid), nv, nvalid, g, lam)
    d1 = 1.0 - 0.2  # no bootstrap after the life loss
    d0 = 1.0 + g * 0.2 - 0.5
    d3 = 1.0 + g * 0.8 - 0.3  # truncation bootstraps V(final obs) = value of the autoreset step
    assert adv[1, 0].item() == pytest.approx(d1)
    assert adv[0, 0].item() == pytest.approx(d0 + g * lam * d1)
    assert adv[3, 0].item() == pytest.approx(d3)  # chain cut at the invalid step
    torch.testing.assert_close(ret, adv + v)


def test_invalid_steps_are_left_out_of_the_batch():
    buf = {"valid": torch.tensor([[True, False], [True, True], [False, True]]), "rewards": torch.zeros(3, 2)}
    buf["actions"], buf["frozen/p/1"] = torch.arange(6).reshape(3, 2), torch.arange(30.0).reshape(3, 2, 5)
    adv = torch.zeros(3, 2)
    batch = P.flatten_rollout(buf, adv, adv)
    assert sorted(batch) == ["actions", "advantages", "frozen/p/1", "returns"]
    assert batch["actions"].tolist() == [0, 2, 3, 5]
    assert torch.equal(batch["frozen/p/1"], buf["frozen/p/1"].reshape(6, 5)[[0, 2, 3, 5]])


def test_reset_and_shrink_perturb_touch_only_trainable_terms():
    agent, optimizer = _agent()
    args = _args(inject_target="encoder")
    P.ppo_update(agent, optimizer, _batch(agent), args)
    _inject(agent, optimizer, args, _batch(agent, 4)["obs"])
    P.ppo_update(agent, optimizer, _batch(agent, seed=1), args)
    frozen = {n: p.clone() for n, p in agent.named_parameters() if not p.requires_grad}
    before = {n: p.clone() for n, p in agent.named_parameters()}
    fresh = P.target_modules(agent, "heads")
    log = P.reset_modules(agent, list(fresh), optimizers=[optimizer], make_fresh=fresh)
    assert log["interventions/reset_params"] == 512 * N_ACTIONS + N_ACTIONS + 512 + 1
    assert agent.policy.action_net.weight not in optimizer.state  # Adam state of reset parameters cleared
    trained_copy = agent.policy.features_extractor.terms[1].linear[0].weight
    assert trained_copy in optimizer.state  # the others keep theirs
    assert torch.allclose(agent.policy.value_net.weight.norm(), torch.tensor(1.0), atol=1e-5)  # own init scheme
    assert torch.equal(trained_copy, before["policy.features_extractor.terms.1.linear.0.weight"])
    P.shrink_perturb(agent, ["policy"], 0.5, 0.01, make_fresh=P.target_modules(agent, "all"))
    assert not torch.equal(trained_copy, before["policy.features_extractor.terms.1.linear.0.weight"])
    for n, p in agent.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_non_finite_loss_stops_before_any_step():
    agent, optimizer = _agent()
    batch = _batch(agent)
    batch["returns"][5] = float("nan")  # one sample: its minibatch's value loss is NaN
    with pytest.raises(P.UserError, match=r"PPO loss became non-finite \(nan\) at global step 4096; try a lower"):
        P.ppo_update(agent, optimizer, batch, _args(norm_adv=True), global_step=4096)
    # a step on the NaN loss would have made every weight it touches NaN; at most the other minibatch stepped
    assert all(torch.isfinite(v).all() for v in agent.state_dict().values())
