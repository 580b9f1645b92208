"""The README's recipe, followed as a new user would: copy the injection block into a cleanRL-shaped DQN loop of
one's own (module paths unlike ours, an auxiliary head registered after the injected one, gradient clipping over all
parameters), inject twice, and check the method's invariants along the way; then save, reload and resume with a
rebuilt trainable-only optimizer. The lines marked `# + injection` and `# + resume` are the ones the README tells
you to add."""

import random

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from test_injection_block import extract_block
from torch import nn

blk = extract_block("dqn_atari_injection.py")  # the block exactly as a user copies it out of a script
inject_plasticity = blk.inject_plasticity


class QNetwork(nn.Module):  # cleanRL's dqn.py network, with a name for its encoder and head
    def __init__(self, n_obs, n_actions):
        super().__init__()
        self.torso = nn.Sequential(nn.Linear(n_obs, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.q_values = nn.Linear(84, n_actions)
        self.aux = nn.Linear(84, n_obs)  # an auxiliary head (next-observation prediction), registered after q_values

    def forward(self, x):
        return self.q_values(self.torso(x))


def update(q_network, target_network, optimizer, batch):
    """One DQN update plus the auxiliary loss; gradients clipped over ALL parameters, as cleanRL does."""
    o, a, r, o2, d = (torch.tensor(np.array(x)) for x in zip(*batch))
    with torch.no_grad():
        target = r.float() + 0.99 * target_network(o2).max(1).values * (1 - d.float())
    loss = F.mse_loss(q_network(o).gather(1, a[:, None]).squeeze(1), target)
    loss = loss + F.mse_loss(q_network.aux(q_network.torso(o)), o2)
    optimizer.zero_grad()
    loss.backward()
    trainable_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in q_network.parameters() if p.requires_grad])
    )
    norm = nn.utils.clip_grad_norm_(q_network.parameters(), 10.0)
    torch.testing.assert_close(norm, trainable_norm)  # frozen parameters carry no stale gradient
    optimizer.step()


def test_recipe_in_a_cleanrl_dqn_loop(tmp_path):
    seed, total, learning_starts, inject_at = 1, 3000, 500, [1500, 2300]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    env = gym.make("CartPole-v1")
    q_network = QNetwork(4, 2)
    target_network = QNetwork(4, 2)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=2.5e-4)
    buffer = []
    probe_rng = random.Random(seed)  # + injection: drawing the probe leaves the loop's own random state alone
    obs, _ = env.reset(seed=seed)
    for global_step in range(total):
        epsilon = max(0.05, 1 - global_step / 1000)
        if random.random() < epsilon:
            action = env.action_space.sample()
        else:
            action = int(q_network(torch.tensor(obs)).argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.append((obs, action, reward, next_obs, terminated))
        obs = env.reset()[0] if terminated or truncated else next_obs

        if global_step in inject_at:  # + injection
            probe = torch.tensor(np.array([b[0] for b in probe_rng.sample(buffer, 256)]))  # + injection
            n_before = sum(p.numel() for p in q_network.parameters() if p.requires_grad)
            with torch.no_grad():
                q_before = q_network(probe)
            log = inject_plasticity(  # + injection
                q_network, ["q_values"], probe, targets=[target_network], sync_targets=True, optimizers=[optimizer]
            )  # + injection
            with torch.no_grad():
                assert torch.equal(q_network(probe), q_before)  # output unchanged, bit for bit
                assert torch.equal(target_network(probe), q_before)  # target synced and mirrored
            assert log["injection/output_change"] == 0.0
            assert sum(p.numel() for p in q_network.parameters() if p.requires_grad) == n_before
            frozen = {n: p.detach().clone() for n, p in q_network.named_parameters() if not p.requires_grad}

        if global_step > learning_starts and global_step % 4 == 0:
            update(q_network, target_network, optimizer, random.sample(buffer, 64))
            if global_step % 500 == 0:
                target_network.load_state_dict(q_network.state_dict())

    assert int(q_network.q_values.injection_count) == 2 and len(q_network.q_values.terms) == 5
    for n, p in q_network.named_parameters():  # frozen since the second injection, and gradient-free
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
    assert all(p.grad is not None for p in q_network.torso.parameters())  # the encoder kept learning
    assert all(p.grad is not None for p in q_network.aux.parameters())

    # Save, then resume as the README says: fresh networks, an optimizer rebuilt over the trainable parameters
    torch.save({"q": q_network.state_dict(), "target": target_network.state_dict()}, tmp_path / "model.pt")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    saved = torch.load(tmp_path / "model.pt")
    q2, target2 = QNetwork(4, 2), QNetwork(4, 2)
    blk.load_injected_state_dict(q2, saved["q"])  # + resume
    blk.load_injected_state_dict(target2, saved["target"])  # + resume
    optimizer2 = torch.optim.Adam((p for p in q2.parameters() if p.requires_grad), lr=2.5e-4)  # + resume
    optimizer2.load_state_dict(torch.load(tmp_path / "optimizer.pt"))  # + resume
    trainable = [n for n, p in q_network.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in q2.named_parameters() if p.requires_grad]
    for n in trainable:  # every trainable parameter got its own Adam moments back, exactly
        want, got = optimizer.state[q_network.get_parameter(n)], optimizer2.state[q2.get_parameter(n)]
        assert want.keys() == got.keys(), n
        assert all(torch.equal(want[k], got[k]) for k in want), n
    batch = random.sample(buffer, 64)
    update(q_network, target_network, optimizer, batch)
    update(q2, target2, optimizer2, batch)
    for (n, p), (n2, p2) in zip(q_network.named_parameters(), q2.named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, p2), n
