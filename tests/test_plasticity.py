"""The plasticity block (shared_blocks/plasticity.py): each metric against hand-computed values,
frozen vs trainable parts after an injection, and no side effects on training."""

import ast
import builtins
import math
import re
import symtable
from pathlib import Path

import pytest
import torch
from conftest import load_blocks
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# The blocks whose names (definitions and imports) a block may use: those run before it in a script, in the order
# of conftest.load_blocks. The plasticity block needs only torch.
EARLIER_BLOCKS = {"plasticity": (), "interventions": ("flags", "common", "injection", "plasticity")}


def defined_names(path: Path) -> set:
    """Global names a file defines or imports."""
    table = symtable.symtable(path.read_text(), str(path), "exec")
    return {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}


def free_globals(path: Path) -> set:
    """Global names a file reads but neither defines, imports nor gets from builtins."""
    table = symtable.symtable(path.read_text(), str(path), "exec")
    defined = defined_names(path)
    used, stack = set(), [table]
    while stack:
        t = stack.pop()
        stack.extend(t.get_children())
        used |= {s.get_name() for s in t.get_symbols() if s.is_referenced() and (t is table or s.is_global())}
    return used - defined - set(dir(builtins))


B = load_blocks("plasticity")


@pytest.mark.parametrize("name", ["plasticity", "interventions"])
def test_block_imports_what_it_uses(name):
    provided = set().union(*(defined_names(ROOT / "shared_blocks" / f"{b}.py") for b in EARLIER_BLOCKS[name]))
    assert free_globals(ROOT / "shared_blocks" / f"{name}.py") <= provided


def _top_level_names(tree):
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_block_names_do_not_shadow_script_names():
    """Blocks are pasted after a script's own definitions: a same-named block function would
    silently replace the script's one."""
    block_names = {}
    for name in ("plasticity", "interventions"):
        for n in _top_level_names(ast.parse((ROOT / "shared_blocks" / f"{name}.py").read_text())):
            block_names[n] = name
    marker = re.compile(r"^# ==== BEGIN SHARED BLOCK.*?^# ==== END SHARED BLOCK: [\w-]+ ====$", re.S | re.M)
    for script in ("dqn_atari_injection.py", "ppo_atari_injection.py", "iql_pointmass_injection.py"):
        path = ROOT / script
        if not path.exists():
            continue
        own = _top_level_names(ast.parse(marker.sub("", path.read_text())))
        clashes = {n: block_names[n] for n in own & set(block_names)}
        assert not clashes, f"{script} defines names that shared blocks also define: {clashes}"


# -- effective rank ------------------------------------------------------------------------------
def test_effective_rank_known_matrices():
    for n in (1, 3, 8):
        assert float(B.effective_rank(torch.eye(n))) == pytest.approx(n, abs=1e-9)
    u, v = torch.randn(7, 1), torch.randn(1, 5)
    assert float(B.effective_rank(u @ v)) == pytest.approx(1.0, abs=1e-6)  # rank 1
    assert float(B.effective_rank(torch.zeros(4, 3))) == 0.0  # guarded, not NaN
    # zero singular values contribute 0 log 0 = 0: diag(1, 1, 0) has erank 2
    assert float(B.effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0])))) == pytest.approx(2.0, abs=1e-9)


def test_effective_rank_by_hand():
    # singular values 3 and 1: p = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.754765
    by_hand = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert by_hand == pytest.approx(0.75**-0.75 * 4**0.25) == pytest.approx(1.754765, abs=1e-6)
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    a = rot @ torch.diag(torch.tensor([3.0, 1.0])) @ rot.T  # same singular values, not diagonal
    assert float(B.effective_rank(a)) == pytest.approx(by_hand, abs=1e-6)
    # wide and tall versions (padding with zero rows/columns changes no singular value)
    assert float(B.effective_rank(torch.cat([a, torch.zeros(2, 5)], 1))) == pytest.approx(by_hand, abs=1e-6)
    assert float(B.effective_rank(torch.cat([a, torch.zeros(5, 2)], 0))) == pytest.approx(by_hand, abs=1e-6)


def test_conv_features_use_channels_as_units():
    # (B=2, C=3, H=1, W=2): channel 2 = 2 * channel 0, channel 1 independent -> rank-2 (B*H*W) x C matrix
    h = torch.zeros(2, 3, 1, 2)
    h[:, 0] = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    h[:, 1] = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]])
    h[:, 2] = 2 * h[:, 0]
    m = B.unit_matrix(h)
    assert m.shape == (4, 3)
    assert torch.equal(m[:, 2], 2 * m[:, 0])
    sigma = torch.linalg.svdvals(m.double())
    p = sigma / sigma.sum()
    expected = math.exp(-sum(float(x * math.log(x)) for x in p if x > 0))
    assert float(B.effective_rank(m)) == pytest.approx(expected, abs=1e-6)
    assert 1.0 < expected < 2.0 + 1e-9


# -- dormant ratio -------------------------------------------------------------------------------
def test_dormant_ratio_constructed_activations():
    # mean |h| per unit = (1.0, 0.02, 0.0, 2.98); their mean is 1.0, so s = those values
    h = torch.tensor([[1.0, 0.04, 0.0, 2.98], [-1.0, 0.0, 0.0, -2.98]])
    assert float(B.dormant_ratio(h, tau=0.025)) == pytest.approx(0.5)  # units 1 and 2
    assert float(B.dormant_ratio(h, tau=0.01)) == pytest.approx(0.25)  # unit 2 only
    assert float(B.dormant_ratio(torch.zeros(3, 4))) == 1.0
    # conv: units are channels, averaged over batch and positions
    c = torch.ones(2, 4, 3, 3)
    c[:, 3] = 0.001  # s_3 = 0.001 / ((3 + 0.001) / 4) = 0.00133 <= 0.025
    assert float(B.dormant_ratio(c)) == pytest.approx(0.25)


# -- layers, updated units, full measurement -----------------------------------------------------
class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.head(self.encoder(x))


def test_hidden_layers_and_dead_units():
    torch.manual_seed(0)
    net = Net(hidden=4)
    assert list(B.hidden_layers(net)) == ["encoder.0", "head.0"]  # head.2 is the output layer
    assert list(B.weight_layers(net)) == ["encoder.0", "head.0", "head.2"]
    with torch.no_grad():
        net.encoder[0].weight.uniform_(0.1, 1.0)
        net.encoder[0].bias.copy_(torch.tensor([-100.0, -100.0, 10.0, 10.0]))  # units 0, 1 never fire
    x = torch.rand(16, 3)
    m = B.measure_plasticity(net, x, loss_fn=lambda mdl: mdl(x).pow(2).sum())
    assert m["plasticity/trainable/encoder.0/updated_units_pct"] == pytest.approx(50.0)
    assert m["plasticity/trainable/encoder.0/dormant_ratio"] >= 0.5
    g = torch.autograd.grad(net(x).pow(2).sum(), net.encoder[0].weight)[0]
    assert torch.equal(g[:2], torch.zeros_like(g[:2])) and bool((g[2:] != 0).any(1).all())
    # hand values for the other metrics
    w = net.head[0].weight.detach()
    assert m["plasticity/trainable/head.0/weight_magnitude"] == pytest.approx(float(w.abs().mean()), rel=1e-6)
    feats = net.head[1](net.head[0](net.encoder(x))).detach()
    assert m["plasticity/trainable/head.0/feature_norm"] == pytest.approx(float(feats.norm(dim=1).mean()), rel=1e-5)
    grads = torch.autograd.grad(net(x).pow(2).sum(), list(net.parameters()))
    assert m["plasticity/grad_norm"] == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()), rel=1e-5)
    layer_means = [m[f"plasticity/trainable/{n}/weight_magnitude"] for n in ("encoder.0", "head.0", "head.2")]
    assert m["plasticity/weight_magnitude_mean"] == pytest.approx(sum(layer_means) / 3)
    assert "plasticity/trainable/head.2/erank_features" not in m  # output layer is not hidden


def test_reused_activation_module_is_refused():
    act = nn.ReLU()
    net = nn.Sequential(nn.Linear(2, 3), act, nn.Linear(3, 3), act, nn.Linear(3, 1))
    with pytest.raises(ValueError, match="reused"):
        B.hidden_layers(net)


def test_aliased_modules_are_measured_once():
    class Aliased(nn.Module):  # like SB3's features_extractor / pi_features_extractor aliases
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
            self.pi_features = self.features
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.features(x))

    net = Aliased()
    assert list(B.hidden_layers(net)) == ["features.0"]
    m = B.measure_plasticity(net, torch.rand(4, 3))
    assert not any("pi_features" in k for k in m) and "plasticity/trainable/features.0/erank_features" in m


def test_conv_net_keys_and_norms():
    conv = (nn.Conv2d(2, 4, 3), nn.GroupNorm(1, 4), nn.LeakyReLU(0.01))
    net = nn.Sequential(*conv, nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    assert list(B.hidden_layers(net)) == ["0"]  # conv -> norm -> activation
    m = B.measure_plasticity(net, torch.rand(5, 2, 6, 6))
    assert 1.0 <= m["plasticity/trainable/0/erank_features"] <= 4.0
    assert 1.0 <= m["plasticity/trainable/0/erank_weights"] <= 4.0
    assert "plasticity/trainable/4/erank_weights" in m and "plasticity/grad_norm" not in m


def test_measuring_has_no_side_effects_on_training():
    """Same seed: training with measurements in between gives bit-identical weights, .grad and Adam state."""

    def run(measure):
        torch.manual_seed(1)
        net = Net()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        x, y = torch.rand(32, 3), torch.rand(32, 2)
        for _ in range(5):
            opt.zero_grad()
            (net(x) - y).pow(2).mean().backward()
            if measure:
                grads = [p.grad.clone() for p in net.parameters()]
                B.measure_plasticity(net, x, loss_fn=lambda mdl: (mdl(x) - y).pow(2).mean())
                assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
            opt.step()
        return net, opt, torch.rand(1)  # the RNG state shows up in the next draw

    (n1, o1, r1), (n2, o2, r2) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(n1.state_dict().values(), n2.state_dict().values()))
    assert torch.equal(r1, r2)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)


# -- injected networks ---------------------------------------------------------------------------
class Wrapper(nn.Module):
    """Lets the whole network be injected (injection needs a sub-module path)."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(x)


def _train(model, x, y, steps=5):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def test_injected_head_reports_frozen_and_trainable_parts():
    torch.manual_seed(0)
    net = Net()
    x, y = torch.rand(64, 3), torch.rand(64, 2)
    _train(net, x, y)
    before = B.measure_plasticity(net, x)
    assert not any("/frozen/" in k for k in before)
    B.inject_plasticity(net, ["head"], x)
    loss = lambda mdl: (mdl(x) - y).pow(2).mean()  # noqa: E731
    m1 = B.measure_plasticity(net, x, loss_fn=loss)
    for k in ("head.terms.0.0", "head.terms.0.2", "head.terms.2.0", "head.terms.2.2"):
        assert f"plasticity/frozen/{k}/weight_magnitude" in m1
        assert f"plasticity/trainable/{k}/weight_magnitude" not in m1
        assert f"plasticity/frozen/{k}/grad_norm" not in m1  # frozen: no gradient metrics
    for k in ("encoder.0", "head.terms.1.0", "head.terms.1.2"):
        assert f"plasticity/trainable/{k}/updated_units_pct" in m1
    # the frozen original head carries on the pre-injection values of the head
    assert m1["plasticity/frozen/head.terms.0.0/erank_weights"] == before["plasticity/trainable/head.0/erank_weights"]
    # _mean keys average the trainable parts only; frozen parts have their own means
    trainable = ("encoder.0", "head.terms.1.0", "head.terms.1.2")
    train_wm = [m1[f"plasticity/trainable/{k}/weight_magnitude"] for k in trainable]
    assert m1["plasticity/weight_magnitude_mean"] == pytest.approx(sum(train_wm) / 3)
    assert "plasticity/frozen/weight_magnitude_mean" in m1
    _train(net, x, y)
    m2 = B.measure_plasticity(net, x, loss_fn=loss)
    assert set(m1) == set(m2)
    for k in m1:
        if "/frozen/" in k and ("weight" in k):  # frozen weights: constant
            assert m1[k] == m2[k], k
        if "/trainable/" in k and k.endswith("weight_magnitude"):
            assert m1[k] != m2[k], k
    # features of the frozen head move with the shared (still trained) encoder
    assert m1["plasticity/frozen/head.terms.0.0/feature_norm"] != m2["plasticity/frozen/head.terms.0.0/feature_norm"]


def test_whole_network_injection_frozen_metrics_constant():
    torch.manual_seed(0)
    model = Wrapper()
    x, y = torch.rand(64, 3), torch.rand(64, 2)
    _train(model, x, y)
    B.inject_plasticity(model, ["net"], x)
    m1 = B.measure_plasticity(model, x)
    _train(model, x, y)
    m2 = B.measure_plasticity(model, x)
    frozen = [k for k in m1 if "/frozen/" in k]
    trainable = [k for k in m1 if "/trainable/" in k and "weight" in k]
    assert frozen and trainable
    assert all(m1[k] == m2[k] for k in frozen)  # every frozen metric, features included
    assert all(m1[k] != m2[k] for k in trainable)
    assert all(".terms.1." in k for k in m1 if "/trainable/" in k)


def test_plasticity_keys_match_measurement():
    net = Net()
    x = torch.rand(8, 3)
    keys = B.plasticity_keys(net, with_grads=True)
    m = B.measure_plasticity(net, x, loss_fn=lambda mdl: mdl(x).sum())
    assert keys == {k for k in m if k.endswith("_mean") or k == "plasticity/grad_norm"}
    assert B.plasticity_keys(net, with_grads=False) == {k for k in B.measure_plasticity(net, x) if k.endswith("_mean")}
