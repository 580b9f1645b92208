"""--compile compiles the networks in place with torch.compile: the same losses, gradients, injection invariants,
metrics and saved weights as without it, within float tolerance (the compiled kernels add in another order)."""

import copy
import functools
import os
import types

import numpy as np
import pytest
import torch
from conftest import load_script, run_script

TOL = dict(rtol=1e-4, atol=1e-5)


@functools.cache
def compile_problem() -> str:
    """Why torch.compile cannot work here, as the scripts' start-up check (check_compile) says it; "" when it works."""
    D = load_script("dqn_atari_injection")
    try:
        D.check_compile(types.SimpleNamespace(compile=True, cuda=False))
    except D.UserError as e:
        return str(e)
    return ""


@pytest.fixture
def compiler():
    """A working torch.compile (it needs a C++ compiler on a CPU), its caches and counters fresh."""
    if compile_problem():
        pytest.skip(compile_problem())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def assert_close_lists(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, **TOL)


def loss_and_grads(loss_fn, model):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_dqn_compiled_network_matches_eager_through_injection_and_updates(compiler):
    D = load_script("dqn_atari_injection")
    args = D.Args(env_id="CartPole-v1", compile=True)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g), torch.rand(32, generator=g))
    batch += ((torch.rand(32, generator=g) < 0.2).float(), torch.randn(32, 4, generator=g))
    torch.manual_seed(0)
    nets = {"eager": D.QNetwork((4,), 2, atari=False)}
    nets["compiled"] = copy.deepcopy(nets["eager"])
    nets["compiled"].compile()
    targets = {k: copy.deepcopy(nets["eager"]) for k in nets}
    opts = {k: torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True) for k, net in nets.items()}
    td = {k: (lambda net, k=k: D.td_loss(net, targets[k], batch, args)[0]) for k in nets}

    eager, compiled = (loss_and_grads(td[k], nets[k]) for k in ("eager", "compiled"))
    assert compiled_graphs() >= 1  # it really ran compiled
    torch.testing.assert_close(eager[0], compiled[0], **TOL)
    assert_close_lists(eager[1], compiled[1])

    logs = {}
    for k in nets:  # the same fresh pair in both: the same seed before each injection
        torch.manual_seed(5)
        logs[k] = D.apply_intervention("injection", nets[k], targets[k], opts[k], batch[0], args)
    assert logs["compiled"]["injection/output_change"] <= 1e-6
    assert logs["compiled"]["injection/trainable_params"] == logs["eager"]["injection/trainable_params"]
    assert set(nets["compiled"].state_dict()) == set(nets["eager"].state_dict())  # no `_orig_mod.` keys

    graphs = compiled_graphs()
    for _ in range(3):
        for k in nets:
            D.dqn_update(nets[k], targets[k], opts[k], batch, args)
    assert compiled_graphs() > graphs  # the injected network was compiled anew, not run as the old graph
    for (name, p), q in zip(nets["eager"].named_parameters(), nets["compiled"].parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=name)
    frozen = nets["compiled"].net[1].terms[0][0].weight
    assert not frozen.requires_grad and frozen.grad is None
    eager, compiled = (loss_and_grads(td[k], nets[k]) for k in ("eager", "compiled"))
    assert_close_lists(eager[1], compiled[1])

    metrics = {k: D.plasticity_metrics(nets[k], targets[k], batch, args) for k in nets}  # forward hooks work
    assert metrics["eager"].keys() == metrics["compiled"].keys()
    for key, value in metrics["eager"].items():
        assert metrics["compiled"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


def test_ppo_compiled_agent_matches_eager_with_the_frozen_output_cache(compiler):
    P = load_script("ppo_atari_injection")
    args = P.Args(inject_target="encoder", compile=True)
    torch.manual_seed(0)
    eager, _ = P.build_agent(args, 4, torch.device("cpu"))
    compiled = copy.deepcopy(eager)
    compiled.compile()
    opts = {id(a): torch.optim.Adam(a.parameters(), lr=2.5e-4, eps=1e-5) for a in (eager, compiled)}
    obs = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for agent in (eager, compiled):
        torch.manual_seed(5)
        log = P.intervene("inject", agent, opts[id(agent)], args, obs)
        assert log["injection/output_change"] <= 1e-5
    paths = P.cached_paths(eager, args)
    assert paths  # encoder injection caches the frozen terms' outputs
    outs = {}
    for agent in (eager, compiled):
        cache = agent.frozen_outputs(obs, paths)
        _, logp, entropy, value = agent.get_action_and_value(obs, action=torch.zeros(16, dtype=torch.long), cache=cache)
        loss = logp.mean() + entropy.mean() + value.pow(2).mean()
        agent.zero_grad(set_to_none=True)
        loss.backward()
        outs[id(agent)] = [loss.detach()] + [p.grad.clone() for p in agent.parameters() if p.requires_grad]
    assert compiled_graphs() >= 1
    assert_close_lists(outs[id(eager)], outs[id(compiled)])
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_iql_compiled_agent_matches_eager_through_injection(compiler):
    Q = load_script("iql_pointmass_injection")
    agents = {}
    for flag in (False, True):
        torch.manual_seed(0)
        agents[flag] = Q.IQLAgent(Q.Args(compile=flag), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batch = (torch.rand(64, 2, generator=g), torch.randint(0, 5, (64,), generator=g), torch.rand(64, generator=g))
    batch += (torch.rand(64, 2, generator=g), (torch.rand(64, generator=g) < 0.1).float())
    for agent in agents.values():
        torch.manual_seed(5)
        log = Q.inject_critics(agent, batch[0], agent.args)
        assert log["injection/output_change"] <= 1e-6
    stats = {flag: [agent.update(batch) for _ in range(3)][-1] for flag, agent in agents.items()}
    assert compiled_graphs() >= 1
    for key, value in stats[False].items():
        torch.testing.assert_close(stats[True][key], value, **TOL, msg=key)
    for name, net in agents[False].networks.items():
        other = agents[True].networks[name].state_dict()
        assert set(other) == set(net.state_dict())
        for key, value in net.state_dict().items():
            torch.testing.assert_close(other[key], value, **TOL, msg=f"{name}.{key}")


def test_dqn_run_with_compile_saves_a_model_that_loads_uncompiled(compiler, tmp_cwd):
    D = load_script("dqn_atari_injection")
    args = D.Args(env_id="CartPole-v1", total_timesteps=600, learning_starts=200, buffer_size=1000, inject_at=[300])
    args.compile, args.save_model, args.eval_episodes, args.metrics_every = True, True, 2, 200
    args.train_frequency, args.target_network_frequency = 4, 100
    summary = D.train(args)
    assert compiled_graphs() >= 1
    assert summary["injections"][0]["injection/output_change"] <= 1e-6
    net = D.load_model(summary["model_path"])
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(8, 4)), dtype=torch.float32)
    assert net(obs).shape == (8, 2) and net.net[1].injection_count == 1


def test_resume_a_compiled_run_without_compile(compiler, tmp_cwd):
    D = load_script("dqn_atari_injection")
    args = D.Args(env_id="CartPole-v1", total_timesteps=600, learning_starts=200, buffer_size=1000, inject_at=[400])
    args.compile, args.checkpoint_every, args.eval_episodes, args.metrics_every = True, 300, 0, 0
    first = D.train(args)
    checkpoint = f"{first['run_dir']}/checkpoints/step_{300:012d}.pt"
    os.remove(f"{first['run_dir']}/finished.json")  # as if killed after that checkpoint: it can be resumed
    args.compile, args.resume = False, checkpoint  # --compile may change on resume: same weights, same keys
    second = D.train(args)
    assert second["run_name"] == first["run_name"] and second["global_step"] == 600
    assert [e["global_step"] for e in second["injections"]] == [400]
    assert second["injections"][0]["injection/output_change"] == 0.0  # uncompiled again: bit for bit


@pytest.mark.parametrize("script", ["dqn_atari_injection", "ppo_atari_injection", "iql_pointmass_injection"])
def test_compile_that_cannot_work_stops_before_anything_is_written(script, tmp_cwd, monkeypatch):
    S = load_script(script)

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    args = S.Args(compile=True, **({"env_id": "CartPole-v1"} if script.startswith("dqn") else {}))
    with pytest.raises(S.UserError, match=r"^--compile: torch.compile does not work here \(InvalidCxxCompiler"):
        S.train(args)
    assert not (tmp_cwd / "runs").exists()


def test_cli_compile_without_a_cxx_compiler_is_one_line(tmp_cwd):
    env = dict(CXX="/nonexistent/g++", TORCHINDUCTOR_CACHE_DIR=str(tmp_cwd / "inductor-cache"))
    proc = run_script("dqn_atari_injection", "--env-id", "CartPole-v1", "--compile", cwd=tmp_cwd, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith("error: --compile: torch.compile does not work here")
    assert not (tmp_cwd / "runs").exists()
