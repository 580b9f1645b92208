"""ppo_atari_injection vs Stable-Baselines3: same observations, same network outputs, same optimizer state;
a tiny real run continuing a real SB3 zip with injection; clear errors for bad input and bad zips."""

import glob
import os

import numpy as np
import pytest
import torch
from conftest import load_script, read_scalars, run_script

P = load_script("ppo_atari_injection")
NAME = "ppo_atari_injection"
TINY = ["--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "2", "--no-cuda"]


@pytest.fixture(scope="session")
def sb3_zips(tmp_path_factory):
    """Real SB3 models, built and saved by stable-baselines3 (shared and separate extractors, plus
    a DQN and an A2C MlpPolicy zip on CartPole), cached for the whole test session."""
    import ale_py
    import gymnasium as gym
    from stable_baselines3 import A2C, DQN, PPO
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    gym.register_envs(ale_py)
    folder = tmp_path_factory.mktemp("sb3_zips")
    out = {}
    for name, share in (("shared", True), ("separate", False)):
        env = VecFrameStack(make_atari_env("BreakoutNoFrameskip-v4", n_envs=1, seed=0), n_stack=4)
        model = PPO(
            "CnnPolicy",
            env,
            n_steps=16,
            batch_size=16,
            n_epochs=2,
            seed=0,
            device="cpu",
            policy_kwargs=dict(share_features_extractor=share),
        )
        model.learn(32)
        out[name] = str(folder / f"ppo_{name}.zip")
        model.save(out[name])
        env.close()
    out["dqn"] = str(folder / "dqn_cartpole.zip")
    DQN("MlpPolicy", "CartPole-v1", buffer_size=100, device="cpu").save(out["dqn"])
    out["a2c"] = str(folder / "a2c_cartpole.zip")
    A2C("MlpPolicy", "CartPole-v1", device="cpu").save(out["a2c"])
    return out


def _sb3_outputs(policy, obs_np):
    """Raw action logits and values from SB3's own policy code."""
    with torch.no_grad():
        obs_t, _ = policy.obs_to_tensor(obs_np)
        features = policy.extract_features(obs_t)
        pi_features = features if policy.share_features_extractor else features[0]
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        logits = policy.action_net(latent_pi)
        dist_logits = policy.get_distribution(obs_t).distribution.logits
        values = policy.predict_values(obs_t).flatten()
    return logits, dist_logits, values


def _real_observations(n_steps=40):
    """Observations from our env pipeline after a few random steps (non-trivial stacks)."""
    envs = P.AtariEnvs("BreakoutNoFrameskip-v4", 2, seed=3)
    obs, _ = envs.reset()
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(n_steps):
        obs, *_ = envs.step(rng.integers(0, envs.n_actions, size=2))
        seen.append(obs)
    envs.close()
    return np.concatenate(seen[-8:])


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_loaded_agent_matches_sb3_policy(sb3_zips, kind):
    from stable_baselines3 import PPO

    info = P.read_sb3_zip(sb3_zips[kind])
    assert info["share"] == (kind == "shared")
    agent = P.Agent(info["n_actions"], info["share"])
    agent.load_state_dict(info["state_dict"])
    # a separate-extractor agent really has two encoders
    assert hasattr(agent.policy, "vf_features_extractor") == (kind == "separate")

    sb3 = PPO.load(sb3_zips[kind], device="cpu")
    obs = _real_observations()
    logits, dist_logits, values = _sb3_outputs(sb3.policy, obs)
    with torch.no_grad():
        out = agent(torch.as_tensor(obs))
    our_logits, our_values = out[:, :-1], out[:, -1]
    torch.testing.assert_close(our_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.log_softmax(our_logits, 1), dist_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_values, values, rtol=1e-5, atol=1e-6)
    # the SB3 weights are trained, not an init our code could reproduce by chance
    assert not torch.allclose(our_values, torch.zeros_like(our_values))


def test_zip_whose_spaces_were_pickled_by_a_package_we_lack_loads(sb3_zips, tmp_path):
    """The public sb3/ agents were saved with the old `gym`: their pickled spaces name modules not installed here.
    Nothing of them is unpickled; the readable copy (older SB3: `shape`) gives the facts, and the weights load."""
    import base64
    import json
    import pickle
    import zipfile

    blob = base64.b64encode(b"cgym.spaces.box\nBox\n.").decode()  # a pickle of the class gym.spaces.box.Box
    old = tmp_path / "old_gym.zip"
    with zipfile.ZipFile(sb3_zips["shared"]) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            content = src.read(item.filename)
            if item.filename == "data":
                data = json.loads(content)
                for key in ("observation_space", "action_space"):
                    data[key][":serialized:"] = blob
                    data[key][":type:"] = data[key][":type:"].replace("gymnasium", "gym")
                data["observation_space"]["shape"] = data["observation_space"].pop("_shape")
                content = json.dumps(data).encode()
            dst.writestr(item, content)
    with pytest.raises(ModuleNotFoundError):  # what unpickling the spaces would meet
        pickle.loads(base64.b64decode(blob))
    info, ref = P.read_sb3_zip(str(old)), P.read_sb3_zip(sb3_zips["shared"])
    assert info["n_actions"] == ref["n_actions"] == 4 and info["share"]
    assert all(torch.equal(v, ref["state_dict"][k]) for k, v in info["state_dict"].items())


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_pretrained_optimizer_state_is_mapped_by_name(sb3_zips, kind):
    from stable_baselines3 import PPO

    info = P.read_sb3_zip(sb3_zips[kind])
    args = P.Args(pretrained=sb3_zips[kind], pretrained_load_optimizer=True, share_features_extractor=info["share"])
    agent, optimizer = P.build_agent(args, info["n_actions"], torch.device("cpu"), info)
    sb3 = PPO.load(sb3_zips[kind], device="cpu")
    ours = dict(agent.named_parameters())
    sb3_params = dict(sb3.policy.named_parameters())
    for sb3_name, p in sb3_params.items():
        name = (
            sb3_name
            if info["share"]
            else sb3_name.replace("features_extractor.", "pi_features_extractor.", 1)
            if sb3_name.startswith("features_extractor.")
            else sb3_name
        )
        mine = ours["policy." + name]
        torch.testing.assert_close(
            optimizer.state[mine]["exp_avg"], sb3.policy.optimizer.state[p]["exp_avg"], rtol=0, atol=0
        )
        torch.testing.assert_close(
            optimizer.state[mine]["exp_avg_sq"], sb3.policy.optimizer.state[p]["exp_avg_sq"], rtol=0, atol=0
        )
    assert optimizer.param_groups[0]["lr"] == args.learning_rate  # our schedule, not the zip's
    # an optimizer step works with the loaded state
    agent(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("env_id", ["BreakoutNoFrameskip-v4", "SpaceInvadersNoFrameskip-v4"])
def test_observation_pipeline_matches_sb3(env_id):
    """Step SB3's AtariWrapper + VecFrameStack(4) + VecTransposeImage and our ale-py envs with the same
    actions (noops disabled: the two emulators draw them from different generators) through life
    losses and game overs: every observation the agent sees, every reward, every done and every game
    score agree exactly."""
    import ale_py
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack, VecTransposeImage

    gym.register_envs(ale_py)
    ours = P.AtariEnvs(env_id, 1, seed=1, noop_max=0)
    sb3 = VecTransposeImage(VecFrameStack(make_atari_env(env_id, n_envs=1, seed=1, wrapper_kwargs=dict(noop_max=0)), 4))
    obs, valid = ours.reset()
    sobs = sb3.reset()
    assert obs.shape == sobs.shape == (1, 4, 84, 84) and obs.dtype == sobs.dtype == np.uint8
    # SB3's stack after a reset: three zero frames, then the newest frame last
    assert (sobs[0, :3] == 0).all() and sobs[0, 3].any()
    rng = np.random.default_rng(0)
    visible = dones = 0
    our_games, sb3_games = [], []
    pending_reward = pending_done = None
    for _ in range(1500):
        a = rng.integers(0, ours.n_actions, size=1)
        if valid[0]:
            visible += 1
            np.testing.assert_array_equal(obs, sobs)
            sobs, sreward, sdone, sinfo = sb3.step(a)
            pending_reward, pending_done = float(sreward[0]), bool(sdone[0])
            sb3_games += [i["episode"]["r"] for i in sinfo if "episode" in i]
        obs, reward, terminated, truncated, new_valid, info = ours.step(a)
        if valid[0]:
            assert reward[0] == pending_reward and bool(terminated[0] or truncated[0]) == pending_done
            dones += pending_done
        valid = new_valid
        our_games += [g[1] for g in info["games"]]
    ours.close()
    assert visible > 1000 and dones >= 3, (visible, dones)  # life losses and game overs were crossed
    assert our_games and our_games == sb3_games[: len(our_games)]


def test_smoke_continues_sb3_zip_injects_midway_and_logs(sb3_zips, tmp_cwd):
    proc = run_script(
        NAME,
        *TINY,
        "--total-timesteps",
        "128",
        "--pretrained",
        sb3_zips["shared"],
        "--pretrained-load-optimizer",
        "--inject-at",
        "64",
        "--inject-target",
        "encoder",
        "--eval-every",
        "64",
        "--eval-episodes",
        "1",
        "--no-eval-deterministic",
        "--save-model",
        "--seed",
        "3",
        cwd=tmp_cwd,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (run_dir,) = glob.glob(str(tmp_cwd / "runs" / "*"))
    scalars = {k: [v for _, v in pairs] for k, pairs in read_scalars(run_dir).items()}
    for key in (
        "charts/learning_rate",
        "charts/SPS",
        "losses/value_loss",
        "losses/policy_loss",
        "losses/entropy",
        "losses/old_approx_kl",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/explained_variance",
        "injection/count",
        "injection/output_change",
        "injection/trainable_params",
        "eval/episodic_return",
    ):
        assert key in scalars, key
    assert len(scalars["losses/value_loss"]) == 4  # 128 steps / 32 per rollout
    assert scalars["injection/count"] == [1.0] and scalars["injection/output_change"] == [0.0]
    assert scalars["injection/trainable_params"] == scalars["injection/trainable_params_before"]
    ckpt = torch.load(glob.glob(os.path.join(run_dir, "*.cleanrl_model"))[0], weights_only=False)
    assert ckpt["global_step"] == 128
    # the reloaded model is the injected one, with the same frozen/trainable split
    agent = P.Agent(ckpt["n_actions"], ckpt["share_features_extractor"])
    P.load_injected_state_dict(agent, ckpt["model"])
    counts = {n: int(m.injection_count) for n, m in agent.named_modules() if isinstance(m, P.InjectedModule)}
    assert counts == {"policy.features_extractor": 1}
    trainable = [sum(p.numel() for p in a.parameters() if p.requires_grad) for a in (agent, P.Agent(4))]
    assert trainable[0] == trainable[1]
    assert not any(p.requires_grad for p in agent.policy.features_extractor.terms[0].parameters())


def _bad(tmp_cwd, *flags):
    proc = run_script(NAME, *TINY, *flags, cwd=tmp_cwd)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_cwd / "runs").exists(), "a run folder was created for bad input"
    return proc.stderr.strip().splitlines()[-1]


def test_bad_input_gives_one_clear_line(sb3_zips, tmp_cwd):
    corrupt = tmp_cwd / "corrupt.zip"
    data = open(sb3_zips["shared"], "rb").read()
    corrupt.write_bytes(data[: len(data) // 2])
    cases = [
        (["--pretrained", str(tmp_cwd / "missing.zip")], ["--pretrained", "missing.zip", "no such file"]),
        (["--pretrained", str(corrupt)], ["--pretrained", "corrupt.zip", "zip"]),
        (["--pretrained", sb3_zips["dqn"]], ["--pretrained", "dqn_cartpole.zip", "DQN"]),
        (["--pretrained", sb3_zips["a2c"]], ["--pretrained", "a2c_cartpole.zip", "PPO"]),
        (["--pretrained", sb3_zips["shared"], "--env-id", "PongNoFrameskip-v4"], ["--pretrained", "4 actions", "6"]),
        (["--total-timesteps", "64", "--inject-at", "100"], ["--inject-at", "100"]),
        (["--env-id", "CartPole-v1"], ["--env-id", "CartPole-v1"]),
    ]
    for flags, words in cases:
        line = _bad(tmp_cwd, *flags)
        assert line.startswith("error: ")
        for w in words:
            assert w in line, (flags, line)


def test_bad_zips_are_named_in_one_line(sb3_zips, tmp_path):
    """Read in-process (quick): not a zip, a zip without policy.pth, an MlpPolicy PPO zip, a bad Adam state."""
    import zipfile

    from stable_baselines3 import PPO

    text, no_policy, mlp = tmp_path / "notes.zip", tmp_path / "no_policy.zip", tmp_path / "ppo_mlp.zip"
    text.write_text("not a zip")
    with zipfile.ZipFile(sb3_zips["shared"]) as src, zipfile.ZipFile(no_policy, "w") as dst:
        for name in src.namelist():
            if name != "policy.pth":
                dst.writestr(name, src.read(name))
    PPO("MlpPolicy", "CartPole-v1", device="cpu").save(mlp)
    for path, words in [(text, "cannot read it"), (no_policy, "policy.pth"), (mlp, "ActorCriticPolicy")]:
        with pytest.raises(P.UserError) as e:
            P.read_sb3_zip(str(path))
        assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    info = P.read_sb3_zip(sb3_zips["shared"])
    info["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    args = P.Args(pretrained=sb3_zips["shared"], pretrained_load_optimizer=True)
    with pytest.raises(P.UserError, match="Adam state does not fit"):
        P.build_agent(args, info["n_actions"], torch.device("cpu"), info)


def test_hub_id_without_network_or_package_needs_a_local_path(tmp_cwd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline even where huggingface_hub is installed and online
    line = _bad(tmp_cwd, "--pretrained", "sb3/ppo-BreakoutNoFrameskip-v4")
    assert "--pretrained sb3/ppo-BreakoutNoFrameskip-v4" in line and "local path" in line
