"""dqn_atari_injection.py: injection invariants, ablations, update function, save/load, bad input, seeding."""

import copy
import functools
import glob
import os
import types

import gymnasium as gym
import pytest
import torch
from conftest import load_script, run_script

dqn = load_script("dqn_atari_injection")

ATARI_SPEC = dqn.EnvSpec("PhoenixNoFrameskip-v4", "phoenix", (4, 84, 84), 8)
VEC_SPEC = dqn.EnvSpec("CartPole-v1", None, (4,), 2)


def make_batch(spec, n, seed):
    g = torch.Generator().manual_seed(seed)
    if spec.atari:
        obs = torch.randint(0, 256, (n, *spec.obs_shape), generator=g, dtype=torch.uint8)
        nxt = torch.randint(0, 256, (n, *spec.obs_shape), generator=g, dtype=torch.uint8)
    else:
        obs, nxt = torch.randn(n, *spec.obs_shape, generator=g), torch.randn(n, *spec.obs_shape, generator=g)
    actions = torch.randint(0, spec.n_actions, (n,), generator=g)
    rewards = torch.randn(n, generator=g)
    terminated = (torch.rand(n, generator=g) < 0.2).float()
    return obs, actions, rewards, terminated, nxt


def setup(spec, target="head", seed=0, **kw):
    """Online + target network + Adam as train() builds them, trained a few real steps."""
    args = dqn.Args(env_id=spec.env_id, inject_target=target, learning_rate=1e-3, **kw)
    torch.manual_seed(seed)
    q = dqn.build_network(spec, args)
    tgt = dqn.build_network(spec, args)
    tgt.load_state_dict(q.state_dict())
    opt = torch.optim.Adam(q.parameters(), lr=args.learning_rate)
    train_steps(q, tgt, opt, spec, 3, seed=100)
    dqn.update_target(tgt, q, 0.5)  # target lags behind the online net, as in a real run
    train_steps(q, tgt, opt, spec, 2, seed=200)
    return args, q, tgt, opt


def train_steps(q, tgt, opt, spec, k, seed):
    for i in range(k):
        dqn.dqn_update(q, tgt, opt, make_batch(spec, 16, seed + i), dqn.Args())  # Double DQN, Huber, γ 0.99


inject = functools.partial(dqn.apply_intervention, "injection")  # the injection as train() calls it


def n_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def head_of(q, target):
    return q.get_submodule(dqn.INJECT_PATHS[target][0])


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


SPECS = [pytest.param(ATARI_SPEC, id="atari"), pytest.param(VEC_SPEC, id="vector")]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("target", ["head", "all"])
def test_injection_keeps_outputs_params_and_mirrors_target(spec, target):
    args, q, tgt, opt = setup(spec, target)
    probe = make_batch(spec, 32, 7)[0]
    trainable = n_params(q, trainable_only=True)
    for k in (1, 2):  # single, then double injection
        with torch.no_grad():
            before = q(probe)
        log = inject(q, tgt, opt, probe, args)
        with torch.no_grad():
            after, target_after = q(probe), tgt(probe)
        assert torch.equal(before, after)
        assert log["injection/output_change"] == 0.0 and log["injection/count"] == k
        assert n_params(q, trainable_only=True) == trainable == log["injection/trainable_params"]
        assert all(p.grad is None for p in q.parameters() if not p.requires_grad), "frozen terms keep no gradient"
        # the target network equals the online network right after injection (synced, then mirrored)
        assert torch.equal(target_after, after)
        sd, tsd = q.state_dict(), tgt.state_dict()
        assert sd.keys() == tsd.keys() and all(torch.equal(sd[key], tsd[key]) for key in sd)
        head = head_of(q, target)
        assert isinstance(head, dqn.InjectedModule) and len(head.terms) == 1 + 2 * k
        # only the newest θ'1 is trainable, and it is exactly what the optimizer updates
        trainable_ids = {id(p) for p in head.terms[-2].parameters()}
        if target == "head":
            trainable_ids |= {id(p) for p in q.net[0].parameters()}
        assert {id(p) for p in q.parameters() if p.requires_grad} == trainable_ids
        assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable_ids
        train_steps(q, tgt, opt, spec, 3, seed=300 + k)  # learn between the two injections


@pytest.mark.parametrize("target", ["head", "all"])
def test_updates_move_only_trainable_parameters(target):
    spec = ATARI_SPEC
    args, q, tgt, opt = setup(spec, target)
    probe = make_batch(spec, 32, 7)[0]
    inject(q, tgt, opt, probe, args)
    inject(q, tgt, opt, probe, args)  # double injection: 5 terms
    head = head_of(q, target)
    before_terms = [snapshot(t) for t in head.terms]
    before_encoder = snapshot(q.net[0]) if target == "head" else None
    train_steps(q, tgt, opt, spec, 5, seed=500)
    for i, (term, old) in enumerate(zip(head.terms, before_terms)):
        now = snapshot(term)
        moved = any(not torch.equal(now[n], old[n]) for n in old)
        assert moved == (i == 3), f"term {i}"  # only the second injection's θ''1 trains
        if i != 3:
            assert all(torch.equal(now[n], old[n]) for n in old)
    if target == "head":
        enc = snapshot(q.net[0])
        assert all(not torch.equal(enc[n], before_encoder[n]) for n in enc), "the shared encoder keeps training"
    # frozen terms of the target network equal the online ones after a hard update
    dqn.update_target(tgt, q, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(tgt.parameters(), q.parameters()))


def test_lagging_target_gets_the_same_fresh_pair():
    spec = VEC_SPEC
    args, q, tgt, opt = setup(spec, "head", inject_sync_target=False)
    probe = make_batch(spec, 32, 7)[0]
    with torch.no_grad():
        t_before, q_before = tgt(probe), q(probe)
    assert not torch.equal(t_before, q_before)  # the target lags
    inject(q, tgt, opt, probe, args)
    with torch.no_grad():
        assert torch.equal(tgt(probe), t_before) and torch.equal(q(probe), q_before)
    qh, th = head_of(q, "head"), head_of(tgt, "head")
    for i in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(qh.terms[i].parameters(), th.terms[i].parameters()))


def test_save_and_reload_injected_model(tmp_cwd):
    for target in ("head", "all"):
        spec = ATARI_SPEC
        args, q, tgt, opt = setup(spec, target, layer_norm=True, activation="leaky_relu")
        probe = make_batch(spec, 8, 7)[0]
        inject(q, tgt, opt, probe, args)
        train_steps(q, tgt, opt, spec, 2, seed=9)
        inject(q, tgt, opt, probe, args)
        train_steps(q, tgt, opt, spec, 2, seed=19)
        path = f"m_{target}.cleanrl_model"
        dqn.save_model(path, q, args, 1234, [{"global_step": 1}], fired=[7])
        q2 = dqn.load_model(path)
        with torch.no_grad():
            assert torch.equal(q(probe), q2(probe))
        assert n_params(q2, trainable_only=True) == n_params(q, trainable_only=True)
        assert [p.requires_grad for p in q2.parameters()] == [p.requires_grad for p in q.parameters()]
        assert int(head_of(q2, target).injection_count) == int(head_of(q, target).injection_count) == 2
        assert torch.load(path, weights_only=True)["adaptive_trigger"] == {"fired": [7]}


def test_load_model_rejects_bad_files(tmp_cwd):
    with open("garbage.cleanrl_model", "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(dqn.UserError, match="garbage.cleanrl_model"):
        dqn.load_model("garbage.cleanrl_model")
    torch.save({"model": {}}, "partial.cleanrl_model")
    with pytest.raises(dqn.UserError, match="partial.cleanrl_model"):
        dqn.load_model("partial.cleanrl_model")
    args, q, *_ = setup(VEC_SPEC)
    dqn.save_model("ok.cleanrl_model", q, args, 0, [])
    ckpt = torch.load("ok.cleanrl_model", weights_only=True)
    ckpt["n_actions"] = 3  # mismatched with the saved weights
    torch.save(ckpt, "mismatch.cleanrl_model")
    with pytest.raises(dqn.UserError, match="mismatch.cleanrl_model"):
        dqn.load_model("mismatch.cleanrl_model")


def test_ablation_without_third_term_changes_output():
    spec = VEC_SPEC
    args, q, tgt, opt = setup(spec, "head", inject_no_third_term=True)
    probe = make_batch(spec, 32, 7)[0]
    with torch.no_grad():
        before = q(probe)
    log = inject(q, tgt, opt, probe, args)
    with torch.no_grad():
        after = q(probe)
    assert log["injection/output_change"] > 0
    assert log["injection/output_change"] == pytest.approx(float((after - before).abs().max()))
    assert len(head_of(q, "head").terms) == 2


def test_ablation_keep_trainable_trains_the_original_head():
    spec = VEC_SPEC
    args, q, tgt, opt = setup(spec, "head", inject_keep_trainable=True)
    head_params = n_params(q.net[1])
    enc_params = n_params(q.net[0])
    log = inject(q, tgt, opt, make_batch(spec, 32, 7)[0], args)
    assert log["injection/output_change"] == 0.0
    assert log["injection/trainable_params"] == enc_params + 3 * head_params
    old = snapshot(head_of(q, "head").terms[0])
    train_steps(q, tgt, opt, spec, 3, seed=900)
    now = snapshot(head_of(q, "head").terms[0])
    assert all(not torch.equal(now[n], old[n]) for n in old)


def adam_moments(opt, params):
    return [opt.state[p]["exp_avg"].clone() if p in opt.state else None for p in params]


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_state_kept_or_reset(reset):
    spec = VEC_SPEC
    args, q, tgt, opt = setup(spec, "head", inject_reset_optimizer=reset)
    encoder = list(q.net[0].parameters())
    before = adam_moments(opt, encoder)
    assert all(m is not None and m.abs().sum() > 0 for m in before)
    inject(q, tgt, opt, make_batch(spec, 32, 7)[0], args)
    after = adam_moments(opt, encoder)
    if reset:
        assert len(opt.state) == 0  # moments and step counts cleared
    else:
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    # frozen parameters left the optimizer with their state; the new θ'1 starts with a fresh state
    head = head_of(q, "head")
    assert not any(p in opt.state for p in head.terms[0].parameters())
    assert not any(p in opt.state for p in head.terms[1].parameters())
    train_steps(q, tgt, opt, spec, 1, seed=77)
    assert all(int(opt.state[p]["step"]) == 1 for p in head.terms[1].parameters())
    if reset:
        assert all(int(opt.state[p]["step"]) == 1 for p in encoder)


def test_double_dqn_and_loss_options():
    spec = VEC_SPEC
    args, q, tgt, opt = setup(spec)
    batch = make_batch(spec, 64, 3)
    obs, actions, rewards, terminated, nxt = batch
    with torch.no_grad():
        q_next, t_next = q(nxt), tgt(nxt)
    results = {}
    for double in (True, False):
        for loss in ("huber", "mse"):
            qq, tt, oo = copy.deepcopy(q), copy.deepcopy(tgt), torch.optim.Adam(copy.deepcopy(q).parameters())
            oo = torch.optim.Adam(qq.parameters(), lr=1e-3)
            with torch.no_grad():
                q_sa = qq(obs).gather(1, actions[:, None]).squeeze(1)
            nv = t_next.gather(1, q_next.argmax(1, keepdim=True)).squeeze(1) if double else t_next.max(1).values
            target = rewards + 0.99 * nv * (1 - terminated)
            expect = (
                torch.nn.functional.smooth_l1_loss(q_sa, target) if loss == "huber" else ((q_sa - target) ** 2).mean()
            )
            got, qmean = dqn.dqn_update(qq, tt, oo, batch, dqn.Args(gamma=0.99, double_dqn=double, loss=loss))
            assert torch.allclose(got, expect) and torch.allclose(qmean, q_sa.mean())
            results[double, loss] = float(got)
    assert results[True, "mse"] != results[False, "mse"]  # double DQN targets differ from the max


def test_non_finite_loss_is_a_clear_error():
    spec = VEC_SPEC
    args, q, tgt, opt = setup(spec)
    obs, actions, rewards, terminated, nxt = make_batch(spec, 8, 1)
    rewards[0] = float("nan")
    before = snapshot(q)
    with pytest.raises(dqn.UserError, match="losses/td_loss became non-finite .* at global step 42"):
        dqn.dqn_update(q, tgt, opt, (obs, actions, rewards, terminated, nxt), args, global_step=42)
    now = snapshot(q)
    assert all(torch.equal(now[n], before[n]) for n in now), "no step is taken on a non-finite loss"


def test_linear_schedule_and_polyak():
    assert dqn.linear_schedule(1.0, 0.01, 100, 0) == 1.0
    assert dqn.linear_schedule(1.0, 0.01, 100, 50) == pytest.approx(0.505)
    assert dqn.linear_schedule(1.0, 0.01, 100, 1000) == 0.01
    args, q, tgt, opt = setup(VEC_SPEC)
    t0 = [p.clone() for p in tgt.parameters()]
    dqn.update_target(tgt, q, 0.25)
    for a, b, c in zip(tgt.parameters(), t0, q.parameters()):
        assert torch.allclose(a, 0.75 * b + 0.25 * c)


# ------------------------------------------------------------------ environments & bad input
def test_the_video_episode_plays_the_evaluated_task(tmp_cwd, monkeypatch):
    """Continual mode: the --capture-video episode of an evaluation during task k feeds the network task k's
    observations (not the raw env's), and each evaluation's video has a file name of its own (its step)."""
    names = []  # the files RecordVideo would write (moviepy need not be installed: a stand-in records the names)

    class Recorder(gym.Wrapper):
        def __init__(self, env, video_folder, name_prefix="rl-video", **kw):
            super().__init__(env)
            self.name_prefix, self.episode_id = name_prefix, -1

        def reset(self, **kw):
            self.episode_id += 1
            names.append(f"{self.name_prefix}-episode-{self.episode_id}")
            return super().reset(**kw)

    monkeypatch.setattr(gym.wrappers, "RecordVideo", Recorder)
    args = dqn.Args(env_id="CartPole-v1", task_switch_every=1000, task_permute_actions=True, eval_episodes=1)
    spec = dqn.make_env_spec(args)
    video_env = dqn.make_video_env(spec, args, "run")
    seen = []  # every observation batch the network is given

    def network(obs):
        seen.append(obs.clone())
        return torch.zeros(len(obs), spec.n_actions)

    writer = types.SimpleNamespace(add_scalar=lambda *a: None)
    for step, task in ((1000, 0), (1500, 1), (2000, 1), (3000, 2)):
        seen.clear()
        _, video_env = dqn.evaluate(network, spec, args, "cpu", step, writer, video_env)
        raw_first, _ = gym.make("CartPole-v1").reset(seed=args.seed + 200_000 + step)  # the video episode's start
        task_first = dqn.PermutedTask(gym.make("CartPole-v1"), args.seed, task, True).observation(raw_first)
        assert any(torch.equal(obs[0], torch.as_tensor(task_first)) for obs in seen), (step, task)
        assert task == 0 or not any(torch.equal(obs[0], torch.as_tensor(raw_first)) for obs in seen), (step, task)
    assert names == [f"rl-video-step{step}-episode-{i}" for i, step in enumerate((1000, 1500, 2000, 3000))]


def test_a_cartpole_video_run_records_each_evaluation_without_noise(tmp_cwd, monkeypatch):
    """--capture-video on a vector-observation env: an mp4 per evaluation, and on a headless machine no SDL line
    (`error: XDG_RUNTIME_DIR is invalid ...`) that reads like one of the script's own errors."""
    for name in ("SDL_VIDEODRIVER", "XDG_RUNTIME_DIR", "DISPLAY"):  # a headless machine
        monkeypatch.delenv(name, raising=False)
    flags = ["--env-id", "CartPole-v1", "--total-timesteps", "600", "--learning-starts", "200", "--buffer-size", "600"]
    flags += ["--eval-every", "300", "--eval-episodes", "1", "--metrics-every", "0", "--capture-video", "--no-cuda"]
    proc = run_script("dqn_atari_injection", *flags, cwd=tmp_cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error" not in proc.stderr and "warning" not in proc.stdout, proc.stderr[-3000:] + proc.stdout[-3000:]
    videos = sorted(os.path.basename(p) for p in glob.glob("videos/*/*.mp4"))
    assert [v.split("-episode")[0] for v in videos] == ["rl-video-step300", "rl-video-step600"], videos


def test_env_ids_resolve():
    assert dqn.make_env_spec(dqn.Args(env_id="PhoenixNoFrameskip-v4")) == dqn.EnvSpec(
        "PhoenixNoFrameskip-v4", "phoenix", (4, 84, 84), 8
    )
    assert dqn.make_env_spec(dqn.Args(env_id="ALE/Phoenix-v5")).atari_game == "phoenix"
    assert dqn.make_env_spec(dqn.Args(env_id="Breakout-v5")) == dqn.EnvSpec(
        "ALE/Breakout-v5", "breakout", (4, 84, 84), 4
    )
    assert dqn.make_env_spec(dqn.Args(env_id="LunarLander-v3")) == dqn.EnvSpec("LunarLander-v3", None, (8,), 4)


BAD_ARGS = [
    (dict(inject_at=[50000]), "--inject-at"),
    (dict(inject_at=[10, 10]), "--inject-at"),
    (dict(inject_at=[5]), "--inject-at .* --learning-starts"),
    (dict(env_id="NoSuchGame-v9"), "--env-id"),
    (dict(env_id="Phoenix-v4"), "--env-id"),
    (dict(env_id="Pendulum-v1"), "--env-id"),
    (dict(noop_max=10), "--noop-max .* Atari-only"),
    (dict(episodic_life=False), "--no-episodic-life .* Atari-only"),
    (dict(frame_stack=2), "--frame-stack .* Atari-only"),
    (dict(learning_starts=20000), "--learning-starts"),
    (dict(buffer_size=2), "--buffer-size"),
    (dict(buffer_size=5, batch_size=4, num_envs=2), "--buffer-size"),
    (dict(buffer_size=10**14), "--buffer-size .* memory"),
    (dict(total_timesteps=0, learning_starts=0), "--total-timesteps"),
    (dict(tau=0.0), "--tau"),
    (dict(num_envs=0), "--num-envs"),
    (dict(train_frequency=0), "--train-frequency"),
    (dict(end_e=1.5), "--end-e"),
    (dict(eval_episodes=-1), "--eval-episodes"),
]


@pytest.mark.parametrize("kw,match", BAD_ARGS)
def test_bad_args_are_clear_errors(kw, match, tmp_cwd):
    base = dict(env_id="CartPole-v1", total_timesteps=20000, learning_starts=1000, buffer_size=1000, cuda=False)
    with pytest.raises(dqn.UserError, match=match):
        dqn.train(dqn.Args(**{**base, **kw}))
    assert not (tmp_cwd / "runs").exists(), "nothing is written before the flags are checked"


@pytest.mark.parametrize(
    "flags,name",
    [
        (
            ["--env-id", "CartPole-v1", "--total-timesteps", "100", "--learning-starts", "10", "--inject-at", "100"],
            "--inject-at",
        ),
        (["--env-id", "NotAnEnv-v0"], "--env-id"),
        (["--env-id", "CartPole-v1", "--repeat-action-probability", "0.25"], "--repeat-action-probability"),
    ],
)
def test_cli_bad_input_exits_cleanly(flags, name, tmp_cwd):
    proc = run_script("dqn_atari_injection", *flags, "--no-cuda", cwd=tmp_cwd, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and name in line
    assert not (tmp_cwd / "runs").exists()


@pytest.mark.parametrize("flag", ["--inject-target", "--loss", "--activation", "--l2-schedule"])
def test_cli_rejects_a_bad_choice(flag, tmp_cwd):
    """tyro checks the Literal choices: non-zero exit naming the flag, no traceback, nothing written."""
    proc = run_script("dqn_atari_injection", "--env-id", "CartPole-v1", flag, "nope", "--no-cuda", cwd=tmp_cwd)
    assert proc.returncode != 0 and flag in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_cwd / "runs").exists()


def test_same_seed_same_numbers(tmp_cwd):
    kw = dict(
        env_id="CartPole-v1",
        total_timesteps=2400,
        learning_starts=400,
        buffer_size=2000,
        batch_size=32,
        train_frequency=2,
        target_network_frequency=200,
        eval_every=1200,
        eval_episodes=3,
        num_envs=2,
        inject_at=[1300],
        save_model=True,
        cuda=False,
        learning_rate=1e-3,
        seed=3,
    )
    a, b = dqn.train(dqn.Args(**kw)), dqn.train(dqn.Args(**kw))
    c = dqn.train(dqn.Args(**{**kw, "seed": 4}))
    for key in ("train_returns", "eval_returns", "losses/td_loss", "losses/q_values", "injections"):
        assert a[key] == b[key], key
    assert a["train_returns"] != c["train_returns"]
    sa, sb = dqn.load_model(a["model_path"]).state_dict(), dqn.load_model(b["model_path"]).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["injections"][0]["global_step"] == 1300 and a["injections"][0]["injection/output_change"] == 0.0
