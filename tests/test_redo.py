"""ReDo (Sokar et al. 2023) in the interventions block: dormant units get fresh incoming and zero outgoing weights."""

import copy
from collections import OrderedDict

import pytest
import torch
from conftest import load_blocks, load_script
from torch import nn

B = load_blocks("plasticity", "interventions")
DEAD = -1e3  # a bias that keeps a ReLU unit at exactly 0 on these small probes


def mlp(act=nn.ReLU):
    return nn.Sequential(nn.Linear(4, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 3))


def trained(model, x, steps=5):
    """`model` after real Adam steps, and its optimizer."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    y = torch.randn_like(model(x))
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    return model, opt


@torch.no_grad()
def kill(bias, units):
    bias[units] = DEAD


@torch.no_grad()
def dormant(seq, x, tau, prefix=""):
    """The oracle, written out on an nn.Sequential: {layer: units with s_i = mean|h_i| / mean_j mean|h_j| <= tau}, h
    the activation's output (batch and positions averaged), and the Sequential's output."""
    out, layer = {}, None
    for i, m in enumerate(seq):
        x = m(x)
        layer = f"{prefix}{i}" if isinstance(m, (nn.Linear, nn.Conv2d)) else layer
        if isinstance(m, nn.ReLU):
            score = x.abs().transpose(0, 1).reshape(x.shape[1], -1).mean(1)
            out[layer] = [i for i in range(len(score)) if score[i] <= tau * score.mean()]
    return out, x


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_recycled(net, before, rows, cols, norms=None):
    """rows {layer: units}: their weight rows and bias entries changed; norms {norm: units}: affine entries back at
    1 and 0; cols {reader: (units, columns per unit)}: 0 (outside the reader's own recycled rows); every other entry
    bit for bit as before. Returns {parameter: mask of the recycled entries}."""
    changed = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    for layer, units in rows.items():
        for k in ("weight", "bias"):
            changed[f"{layer}.{k}"][units] = True
            assert bool((net.get_parameter(f"{layer}.{k}")[units] != before[f"{layer}.{k}"][units]).all()), layer
    for norm, units in (norms or {}).items():
        changed[f"{norm}.weight"][units] = changed[f"{norm}.bias"][units] = True
        assert bool((net.get_parameter(f"{norm}.weight")[units] == 1).all()), norm
        assert not net.get_parameter(f"{norm}.bias")[units].any(), norm
    for reader, (units, per_unit) in cols.items():
        w, col = net.get_parameter(f"{reader}.weight"), torch.zeros_like(changed[f"{reader}.weight"])
        col.view(w.shape[0], -1, per_unit)[:, units] = True
        col &= ~changed[f"{reader}.weight"]
        assert not units or (col.any() and not w[col].any()), reader
        changed[f"{reader}.weight"] |= col
    for n, p in net.named_parameters():
        assert torch.equal(p[~changed[n]], before[n][~changed[n]]), n
    return changed


# -- networks of linear layers ------------------------------------------------------------------------
def mlp_case(seed, kills):
    """A trained MLP with the units {layer: [units]} killed, its optimizer, a probe."""
    torch.manual_seed(seed)
    x = torch.randn(64, 4)
    net, opt = trained(mlp(), x)
    for layer, units in kills.items():
        kill(net[layer].bias, units)
    return net, opt, x


def mlp_expected(net, x, tau):
    """rows and cols for check_recycled from the oracle."""
    sets, _ = dormant(net, x, tau)
    return sets, {"0": sets["0"], "2": sets["2"]}, {"2": (sets["0"], 1), "4": (sets["2"], 1)}


def test_dead_units_are_recycled_without_changing_the_output():
    net, _, x = mlp_case(0, {0: [1, 5], 2: [2, 9]})
    sets, rows, cols = mlp_expected(net, x, tau=0.0)  # tau 0: the units that are exactly 0 on the whole probe
    assert {1, 5} <= set(sets["0"]) and {2, 9} <= set(sets["2"])
    before, out = snapshot(net), net(x).detach()
    log = B.redo(net, x, tau=0.0)
    assert torch.equal(net(x), out)  # their contribution was exactly 0, and it is still
    assert log["interventions/redo_units"] == len(sets["0"]) + len(sets["2"])
    assert log["interventions/redo_dormant_before"] == pytest.approx(log["interventions/redo_units"] / 32)
    check_recycled(net, before, rows, cols)
    assert net[2].weight[sets["2"]].abs().min() > 0  # recycled rows read every unit, with fresh weights


def test_revived_units_are_no_longer_dormant_on_the_probe():
    net, _, x = mlp_case(1, {0: [0, 3, 7]})
    ratio = lambda: B.measure_plasticity(net, x)["plasticity/trainable/0/dormant_ratio"]
    assert ratio() >= 3 / 16
    log = B.redo(net, x)
    assert ratio() == 0.0
    assert log["interventions/redo_dormant_after"] < log["interventions/redo_dormant_before"]


def test_output_changes_by_exactly_the_former_contribution_of_low_activity_units():
    torch.manual_seed(2)
    x = torch.randn(64, 4)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        net[0].weight[[4, 11]] *= 1e-3  # active but tiny: dormant at tau 0.025
        net[0].bias[[4, 11]] = 1e-3
    units = dormant(net, x, tau=0.025)[0]["0"]
    assert {4, 11} <= set(units)
    with torch.no_grad():
        h, w = net[1](net[0](x))[:, units], net[2].weight[:, units]
        contribution, bound, out = h @ w.T, h.abs() @ w.abs().T, net(x)
    assert float(contribution.abs().max()) > 0  # the test can tell
    log = B.redo(net, x, tau=0.025)
    assert log["interventions/redo_units"] == len(units)
    with torch.no_grad():
        change = net(x) - out
    torch.testing.assert_close(change, -contribution, rtol=0, atol=1e-6)
    assert bool((change.abs() <= bound + 1e-6).all())


def test_nothing_dormant_changes_nothing_and_draws_no_random_numbers():
    torch.manual_seed(3)
    x = torch.randn(64, 4)
    net, opt = trained(mlp(nn.LeakyReLU), x)  # never exactly 0: nothing dormant at tau 0
    before, rng = copy.deepcopy(net.state_dict()), torch.get_rng_state()
    log = B.redo(net, x, tau=0.0, optimizers=[opt])
    assert log["interventions/redo_units"] == 0.0 == log["interventions/redo_dormant_before"]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_adam_moments_of_recycled_entries_are_cleared_and_the_others_kept():
    net, opt, x = mlp_case(4, {2: [0, 6]})
    _, rows, cols = mlp_expected(net, x, tau=0.0)
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters()}
    before = snapshot(net)
    B.redo(net, x, tau=0.0, optimizers=[opt])
    masks = check_recycled(net, before, rows, cols)
    for k in ("exp_avg", "exp_avg_sq"):  # the killed units were alive while training: real moments
        assert bool((state["2.weight"][k][[0, 6]] != 0).all()) and bool((state["4.weight"][k][:, [0, 6]] != 0).all())
    for n, p in net.named_parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert not opt.state[p][k][masks[n]].any(), (n, k)
            assert torch.equal(opt.state[p][k][~masks[n]], state[n][k][~masks[n]]), (n, k)
        assert torch.equal(opt.state[p]["step"], state[n]["step"])
    opt.zero_grad()
    net(x).sum().backward()
    opt.step()  # training goes on
    assert int(opt.state[net[0].weight]["step"]) == 6


def test_targets_get_the_same_new_values_and_keep_the_rest():
    net, _, x = mlp_case(5, {0: [2], 2: [4]})
    _, rows, cols = mlp_expected(net, x, tau=0.0)
    target = copy.deepcopy(net)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)  # a lagged target differs everywhere
    before, target_before = snapshot(net), snapshot(target)
    B.redo(net, x, tau=0.0, targets=[target])
    masks = check_recycled(net, before, rows, cols)
    for n, p in target.named_parameters():
        assert torch.equal(p[masks[n]], net.get_parameter(n)[masks[n]]), n
        assert torch.equal(p[~masks[n]], target_before[n][~masks[n]]), n


def test_the_same_seed_gives_the_same_fresh_values_drawn_by_the_layers_init():
    net, _, x = mlp_case(6, {0: [3, 8]})
    a, b, c = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    for model, seed in ((a, 11), (b, 11), (c, 12)):
        torch.manual_seed(seed)
        B.redo(model, x, tau=0.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)
    torch.manual_seed(11)
    fresh = nn.Linear(4, 16)  # the layer's own init, the same draws (layer 0 is drawn first)
    assert torch.equal(a[0].weight[[3, 8]], fresh.weight[[3, 8]]) and torch.equal(a[0].bias[[3, 8]], fresh.bias[[3, 8]])


def test_frozen_layers_and_units_read_by_frozen_layers_are_left_alone():
    net, _, x = mlp_case(10, {0: [1], 2: [3]})
    net[0].requires_grad_(False)  # frozen layer: not recycled, though its readers train
    net[4].requires_grad_(False)  # frozen reader: layer 2's units (read by it) are not recycled
    before, out = snapshot(net), net(x).detach()
    log = B.redo(net, x, tau=0.0)
    assert log["interventions/redo_units"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters()) and torch.equal(net(x), out)
    net[4].requires_grad_(True)  # now layer 2 may be recycled: its incoming weights train, its reader too
    units = dormant(net, x, 0.0)[0]["2"]
    assert B.redo(net, x, tau=0.0)["interventions/redo_units"] == len(units) > 0
    assert torch.equal(net[0].weight, before["0.weight"]) and torch.equal(net[0].bias, before["0.bias"])


def test_units_read_in_a_layout_it_cannot_map_are_left_alone():
    torch.manual_seed(11)
    x = torch.randn(8, 2, 9, 9)
    grouped = nn.Conv2d(4, 4, 3, groups=2)  # reads each channel with only half of its kernels
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), grouped, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 2))
    kill(net[0].bias, [1])
    kill(net[2].bias, [2])
    before, units = snapshot(net), dormant(net, x, 0.0)[0]["2"]
    log = B.redo(net, x, tau=0.0)
    assert log["interventions/redo_units"] == len(units) > 0  # the grouped conv's own units only
    kept = [i for i in range(4) if i not in units]
    assert torch.equal(net[0].weight, before["0.weight"]) and torch.equal(net[2].weight[kept], before["2.weight"][kept])


# -- normalisation layers -------------------------------------------------------------------------------
@pytest.mark.parametrize("conv", [False, True])
def test_a_unit_killed_by_its_norm_is_revived_with_the_norms_entries_reset(conv):
    torch.manual_seed(7)
    if conv:
        x, per_unit = torch.randn(16, 2, 6, 6), 16
        net = nn.Sequential(nn.Conv2d(2, 8, 3), nn.GroupNorm(1, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3))
    else:
        x, per_unit = torch.randn(64, 4), 1
        net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    net, _ = trained(net, x)
    kill(net[1].bias, [1, 6])  # the layer's weights are fine: only resetting the norm's entries revives them
    units = dormant(net, x, tau=0.025)[0]["0"]
    assert {1, 6} <= set(units)
    before = snapshot(net)
    log = B.redo(net, x)
    assert log["interventions/redo_units"] == len(units)
    assert not set(units) & set(dormant(net, x, tau=0.025)[0]["0"])  # revived (the norm may push another one down)
    check_recycled(net, before, {"0": units}, {str(len(net) - 1): (units, per_unit)}, norms={"1": units})


# -- after an injection -----------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.head(self.encoder(x))


def test_composes_with_an_injected_head_recycling_trainable_parts_only():
    torch.manual_seed(8)
    x = torch.randn(64, 3)
    net, opt = trained(Net(), x)
    B.inject_plasticity(net, ["head"], x, optimizers=[opt])
    net, opt = trained(net, x)  # θ'1 moves away from θ'2
    target, terms = copy.deepcopy(net), net.head.terms
    kill(net.encoder[0].bias, [0])  # read by the trainable encoder: recycled
    kill(net.encoder[2].bias, [5])  # read by the frozen terms too: left alone
    kill(terms[0][0].bias, [3])  # the frozen original head: left alone
    kill(terms[1][0].bias, [2, 7])  # θ'1: recycled, its next layer is θ'1's own
    enc, features = dormant(net.encoder, x, 0.0, "encoder.")
    head = dormant(terms[1], features, 0.0, "head.terms.1.")[0]
    assert 0 in enc["encoder.0"] and 5 in enc["encoder.2"] and {2, 7} <= set(head["head.terms.1.0"])
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    before, out = snapshot(net), net(x).detach()
    ratio = lambda: B.measure_plasticity(net, x, tau=0.0)["plasticity/trainable/head.terms.1.0/dormant_ratio"]
    ratio_before = ratio()
    log = B.redo(net, x, tau=0.0, optimizers=[opt], targets=[target])
    assert torch.equal(net(x), out)
    assert log["interventions/redo_units"] == len(enc["encoder.0"]) + len(head["head.terms.1.0"])
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if not p.requires_grad)
    rows = {"encoder.0": enc["encoder.0"], "head.terms.1.0": head["head.terms.1.0"]}
    cols = {"encoder.2": (enc["encoder.0"], 1), "head.terms.1.2": (head["head.terms.1.0"], 1)}
    masks = check_recycled(net, before, rows, cols)  # encoder.2's units are untouched, like the frozen terms
    assert all(torch.equal(target.get_parameter(n)[m], net.get_parameter(n)[m]) for n, m in masks.items())
    assert ratio() < ratio_before  # a fresh draw may be dead again on the probe


# -- a convolutional network, SB3's layout, orthogonal init ------------------------------------------------
class Policy(nn.Module):
    """features_extractor (cnn: conv -> conv -> flatten; linear), action_net and value_net, orthogonal init."""

    def __init__(self):
        super().__init__()
        cnn = nn.Sequential(nn.Conv2d(2, 4, 3, 2), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten())
        linear = nn.Sequential(nn.Linear(6 * 3 * 3, 16), nn.ReLU())
        self.features_extractor = nn.Sequential(OrderedDict(cnn=cnn, linear=linear))
        self.action_net, self.value_net = nn.Linear(16, 3), nn.Linear(16, 1)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.orthogonal_(m.weight, 2**0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        f = self.features_extractor(x)
        return torch.cat([self.action_net(f), self.value_net(f)], dim=1)


def test_conv_network_channels_through_a_flatten_and_a_shared_extractor():
    torch.manual_seed(9)
    x = torch.randn(32, 2, 11, 11)
    net, opt = trained(Policy(), x)
    fe = net.features_extractor
    kill(fe.cnn[0].bias, [1])
    kill(fe.cnn[2].bias, [0, 4])
    kill(fe.linear[0].bias, [7])
    sets, flat = dormant(fe.cnn, x, 0.0, "features_extractor.cnn.")
    sets.update(dormant(fe.linear, flat, 0.0, "features_extractor.linear.")[0])
    c0, c2, l0 = (sets[f"features_extractor.{n}"] for n in ("cnn.0", "cnn.2", "linear.0"))
    assert 1 in c0 and {0, 4} <= set(c2) and 7 in l0
    before, out = snapshot(net), net(x).detach()
    torch.manual_seed(13)
    log = B.redo(net, x, tau=0.0, optimizers=[opt], make_fresh={"": Policy})
    assert torch.equal(net(x), out)
    assert log["interventions/redo_units"] == len(c0) + len(c2) + len(l0)
    # conv -> conv: the kernels' input channels; conv -> flatten -> linear: each channel's 3x3 columns; the
    # extractor's output: both readers
    cols = {"features_extractor.cnn.2": (c0, 9), "features_extractor.linear.0": (c2, 9)}
    cols.update({"action_net": (l0, 1), "value_net": (l0, 1)})
    masks = check_recycled(net, before, sets, cols)
    kept = [i for i in range(16) if i not in l0]  # the linear layer's units that were not recycled themselves
    assert not fe.linear[0].weight[kept][:, 0:9].any() and not fe.linear[0].weight[kept][:, 36:45].any()  # ch. 0, 4
    torch.manual_seed(13)
    ref = Policy()  # make_fresh's draw: the orthogonal init
    for name, units in sets.items():
        for k in ("weight", "bias"):
            assert torch.equal(net.get_parameter(f"{name}.{k}")[units], ref.get_parameter(f"{name}.{k}")[units])
    assert all(not opt.state[p]["exp_avg"][masks[n]].any() for n, p in net.named_parameters())


# -- the three scripts' own networks ------------------------------------------------------------------------
def script_case(script):
    """(model, probe, target or None, biases of units to kill, redo's keyword arguments) after a head injection."""
    torch.manual_seed(0)
    if script == "iql":
        iql = load_script("iql_pointmass_injection")
        agent = iql.IQLAgent(iql.Args(hidden_sizes=[32, 32], cuda=False), torch.device("cpu"))
        x = torch.rand(64, 2)
        B.inject_plasticity(agent.qf, ["q1.head", "q2.head"], x, targets=[agent.qf_target], optimizers=[agent.q_opt])
        kills = [agent.qf.q1.head.terms[1][0].bias, agent.qf.q2.head.terms[1][0].bias]
        return agent.qf, x, agent.qf_target, kills, dict(optimizers=[agent.q_opt], targets=[agent.qf_target])
    x = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    if script == "dqn":
        dqn = load_script("dqn_atari_injection")
        model = dqn.QNetwork((4, 84, 84), 6, atari=True)
        target = copy.deepcopy(model)
        B.inject_plasticity(model, ["net.1"], x, targets=[target])
        kills = [model.net[0][3].bias, model.net[1].terms[1][0].bias]  # 2nd conv; θ'1's hidden layer
        return model, x, target, kills, dict(targets=[target])
    ppo = load_script("ppo_atari_injection")
    agent = ppo.Agent(6)
    fe = agent.policy.features_extractor
    kills = [fe.cnn[2].bias, fe.linear[0].bias]  # a conv; the extractor's output, read by both heads
    return agent, x, None, kills, dict(make_fresh=ppo.target_modules(agent, "all"))


@pytest.mark.parametrize("script", ["dqn", "ppo", "iql"])
def test_the_scripts_networks(script):
    model, x, target, kills, kw = script_case(script)
    for bias in kills:
        kill(bias, [3])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = model(x)
    log = B.redo(model, x, tau=0.0, **kw)
    assert log["interventions/redo_units"] >= len(kills)
    assert all(float(bias.detach()[3]) != DEAD for bias in kills)
    new = model(x)
    for a, b in zip(new if isinstance(new, tuple) else [new], out if isinstance(out, tuple) else [out]):
        assert torch.equal(a, b)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    if target is not None:  # a synced target computes the same function as the online network again
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
