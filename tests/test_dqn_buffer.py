"""The frame-once replay buffer returns exactly the stacks the env gave, checked against brute force."""

import numpy as np
import pytest
from conftest import load_script

dqn = load_script("dqn_atari_injection")


class FakeAtariVectorEnv:
    """Mimics ale-py's AtariVectorEnv (life_loss_info=False): zero-padded stacks at reset, lives in info,
    `terminated` only at game over, truncation at a random time limit, next-step autoreset.
    Every frame is random, so any misplaced frame in a rebuilt stack is detected."""

    def __init__(self, num_envs, stack, frame_shape, seed):
        self.n, self.k, self.shape = num_envs, stack, frame_shape
        self.rng = np.random.default_rng(seed)
        self.stacks = np.zeros((num_envs, stack, *frame_shape), np.uint8)
        self.lives = np.zeros(num_envs, np.int64)
        self.t = np.zeros(num_envs, np.int64)
        self.limit = np.zeros(num_envs, np.int64)
        self.pending_reset = np.zeros(num_envs, bool)
        # ground truth of the step just taken (for the reference, independent of EpisodeTracker)
        self.life_lost = np.zeros(num_envs, bool)

    def _frame(self):
        return self.rng.integers(1, 256, self.shape, dtype=np.uint8)  # never all-zero

    def _reset_env(self, e):
        self.stacks[e] = 0
        self.stacks[e, -1] = self._frame()
        self.lives[e] = self.rng.integers(1, 4)
        self.t[e] = 0
        self.limit[e] = self.rng.integers(1, 14)

    def reset(self, seed=None):
        for e in range(self.n):
            self._reset_env(e)
        return self.stacks.copy(), {"lives": self.lives.copy()}

    def step(self, actions):
        r = np.zeros(self.n)
        term = np.zeros(self.n, bool)
        trunc = np.zeros(self.n, bool)
        self.life_lost[:] = False
        for e in range(self.n):
            if self.pending_reset[e]:  # next-step autoreset: the action is ignored
                self._reset_env(e)
                self.pending_reset[e] = False
                continue
            self.stacks[e, :-1] = self.stacks[e, 1:].copy()
            self.stacks[e, -1] = self._frame()
            self.t[e] += 1
            r[e] = self.rng.choice([-3.0, -1.0, 0.0, 0.0, 2.0, 7.0])
            if self.rng.random() < 0.15:
                self.lives[e] -= 1
                self.life_lost[e] = True
            if self.lives[e] == 0:
                term[e] = True
            elif self.t[e] >= self.limit[e]:
                trunc[e] = True
            self.pending_reset[e] = term[e] or trunc[e]
        return self.stacks.copy(), r, term, trunc, {"lives": self.lives.copy()}


def fill_and_check(env, rb, steps, check_every, life_loss_truth=None, seed=0):
    """Drive env + EpisodeTracker + ReplayBuffer as train() does; keep every full stacked transition
    in a naive list; at checkpoints compare the buffer's view of ALL valid transitions and of sampled
    batches with the reference."""
    rng = np.random.default_rng(seed)
    tracker = dqn.EpisodeTracker(rb.num_envs, episodic_life=True, clip_reward=True)
    obs, info = env.reset(seed=seed)
    rb.reset(obs)
    tracker.reset(info)
    ref = {}  # (env, obs number) -> (obs stack, action, clipped reward, terminal for training, next stack)
    raw_scores, game_score = [], np.zeros(rb.num_envs)
    was_last = np.zeros(rb.num_envs, bool)
    lives = np.array(info["lives"])
    checks = 0
    for t in range(steps):
        actions = rng.integers(0, 4, rb.num_envs)
        next_obs, r, term, trunc, info = env.step(actions)
        new_lives = np.array(info["lives"])
        train_r, train_term, last, finished = tracker.step(r, term, trunc, info)
        raw_scores += [(e, ret) for e, ret, _ in finished]
        for e in range(rb.num_envs):
            if was_last[e]:  # autoreset step: no transition
                game_score[e] = 0
                continue
            lost = life_loss_truth(env, e) if life_loss_truth else new_lives[e] < lives[e]
            ref[e, t] = (obs[e].copy(), actions[e], np.sign(r[e]), bool(term[e] or lost), next_obs[e].copy())
            game_score[e] += r[e]
            if term[e] or trunc[e]:
                assert (e, game_score[e]) in raw_scores, "raw score of the whole game (all lives, unclipped)"
        was_last = np.asarray(term) | np.asarray(trunc)
        lives = new_lives
        rb.add(actions, train_r, train_term, next_obs, last)
        obs = next_obs
        if (t + 1) % check_every == 0:
            check(rb, ref)
            checks += 1
    return ref, checks


def step_range(rb):
    """[lo, hi) of the observation numbers a transition may start from: the newest has no successor yet, and the
    oldest needs its whole stack still in the buffer."""
    return (rb.t - rb.cap + rb.stack - 1 if rb.t > rb.cap else 0), rb.t - 1


def valid_indices(rb):
    """Every (env, step) from which a transition may start: inside step_range and not an episode's last step."""
    lo, hi = step_range(rb)
    steps = np.arange(lo, max(lo, hi))
    envs, steps = np.repeat(np.arange(rb.num_envs), len(steps)), np.tile(steps, rb.num_envs)
    ok = ~rb.last[envs, steps % rb.cap]
    return envs[ok], steps[ok]


def check(rb, ref):
    lo, hi = step_range(rb)
    envs, steps = valid_indices(rb)
    got = set(zip(envs.tolist(), steps.tolist()))
    expected = {(e, t) for (e, t) in ref if lo <= t < hi}
    assert got == expected
    o, a, r, d, n = rb.get(envs, steps)
    for i, key in enumerate(zip(envs.tolist(), steps.tolist())):
        ro, ra, rr, rd, rn = ref[key]
        assert np.array_equal(o[i], ro), f"obs stack of {key}"
        assert np.array_equal(n[i], rn), f"next stack of {key}"
        assert (a[i], r[i], d[i]) == (ra, rr, rd), key
    # sampled batches draw only valid transitions, with the same contents
    se, ss = rb.sample_indices(64)
    assert set(zip(se.tolist(), ss.tolist())) <= expected
    o2, *_ = rb.get(se, ss)
    for i, key in enumerate(zip(se.tolist(), ss.tolist())):
        assert np.array_equal(o2[i], ref[key][0])


@pytest.mark.parametrize("num_envs,capacity", [(1, 40), (3, 90), (2, 10_000)])
def test_frame_stacks_match_brute_force(num_envs, capacity):
    env = FakeAtariVectorEnv(num_envs, 4, (3, 5), seed=num_envs)
    rb = dqn.ReplayBuffer(capacity, num_envs, (3, 5), np.uint8, 4, stacked=True, seed=1)
    ref, checks = fill_and_check(env, rb, 400, 37, life_loss_truth=lambda env, e: env.life_lost[e], seed=num_envs)
    assert checks >= 10
    # the run covered what the test claims to cover
    firsts = int(rb.first.sum())
    assert firsts > 5 and rb.terminated.any() and (~rb.terminated & rb.last).any()
    assert rb.frames.shape == (num_envs, capacity // num_envs, 3, 5), "one frame per step, not two stacks"


def test_vector_obs_buffer():
    """stack 1, float observations: a plain transition buffer with the same autoreset handling."""

    class FakeVec(FakeAtariVectorEnv):
        def step(self, actions):
            o, r, te, tr, info = super().step(actions)
            return o[:, -1].astype(np.float32).reshape(self.n, -1), r, te, tr, info

        def reset(self, seed=None):
            o, info = super().reset(seed)
            return o[:, -1].astype(np.float32).reshape(self.n, -1), info

    env = FakeVec(2, 1, (3,), seed=5)
    rb = dqn.ReplayBuffer(60, 2, (3,), np.float32, 1, stacked=False, seed=1)
    fill_and_check(env, rb, 200, 23, life_loss_truth=lambda env, e: env.life_lost[e], seed=5)


def test_real_atari_env_stacks_match_brute_force():
    """The real ale-py vector env (zero-padded reset stacks, lives, truncation by frame limit)."""
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv(
        "breakout",
        2,
        num_threads=1,
        max_num_frames_per_episode=240,
        episodic_life=False,
        life_loss_info=False,
        reward_clipping=False,
        repeat_action_probability=0.0,
    )
    rb = dqn.ReplayBuffer(400, 2, (84, 84), np.uint8, 4, stacked=True, seed=1)
    try:
        ref, checks = fill_and_check(env, rb, 700, 350, seed=3)
    finally:
        env.close()
    assert checks == 2 and rb.first.sum() >= 2


def test_sampling_is_seeded_and_tensors_have_the_right_shapes():
    env = FakeAtariVectorEnv(1, 4, (84, 84), seed=0)
    obs, info = env.reset()
    rbs = [dqn.ReplayBuffer(500, 1, (84, 84), np.uint8, 4, stacked=True, seed=7) for _ in range(2)]
    for rb in rbs:
        rb.reset(obs)
    for _ in range(100):
        nxt, r, te, tr, info = env.step(np.zeros(1, np.int64))
        for rb in rbs:
            rb.add(np.zeros(1), r, te, nxt, te | tr)
    a, b = rbs[0].sample(32, "cpu"), rbs[1].sample(32, "cpu")
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b))
    o, act, rew, term, n = a
    assert o.shape == n.shape == (32, 4, 84, 84) and str(o.dtype) == "torch.uint8"
    assert act.shape == rew.shape == term.shape == (32,) and str(term.dtype) == "torch.float32"
