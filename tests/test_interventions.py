"""The interventions block (shared_blocks/interventions.py): resets, shrink-and-perturb, L2 schedules, the adaptive
trigger, and the checks of the shared flags (flags block)."""

import copy
import dataclasses
import math
import types

import pytest
import torch
import tyro
from conftest import load_blocks
from torch import nn

B = load_blocks("plasticity", "interventions")


def frozen_terms(head):
    return [t for t, trainable in zip(head.terms, head._trainable) if not trainable]


def trainable_terms(head):
    return [t for t, trainable in zip(head.terms, head._trainable) if trainable]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.encoder(x))


def _trained(steps=3, seed=0):
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.rand(16, 3), torch.rand(16, 2)
    for _ in range(steps):
        opt.zero_grad()
        (net(x) - y).pow(2).mean().backward()
        opt.step()
    return net, opt, x, y


def _snapshot(net, opt):
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters() if p in opt.state}
    return params, state


# -- reset -----------------------------------------------------------------------------------------
def test_reset_changes_exactly_the_chosen_parameters_and_their_optimizer_state():
    net, opt, x, y = _trained()
    target = copy.deepcopy(net)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)  # a lagged target differs from the online net
    target_encoder = copy.deepcopy(target.encoder.state_dict())
    params, state = _snapshot(net, opt)
    log = B.reset_modules(net, ["head"], optimizers=[opt], targets=[target])
    assert log["interventions/reset_params"] == sum(p.numel() for p in net.head.parameters())
    for n, p in net.named_parameters():
        if n.startswith("head."):
            assert not torch.equal(p, params[n]), n
            assert p not in opt.state  # fresh Adam state: moments and step start from zero
        else:
            assert torch.equal(p, params[n]), n  # bit-for-bit
            assert all(torch.equal(v, state[n][k]) for k, v in opt.state[p].items()), n
    # targets get the same new head values, their encoder is untouched
    assert all(torch.equal(a, b) for a, b in zip(net.head.parameters(), target.head.parameters()))
    assert all(torch.equal(v, target.encoder.state_dict()[k]) for k, v in target_encoder.items())
    # the optimizer still trains the reset parameters (same objects) from fresh state
    opt.zero_grad()
    (net(x) - y).pow(2).mean().backward()
    opt.step()
    assert int(opt.state[net.head[0].weight]["step"]) == 1
    assert int(opt.state[net.encoder[0].weight]["step"]) == 4


def test_reset_values_come_from_the_layers_init_or_a_factory():
    net, opt, _, _ = _trained()
    torch.manual_seed(7)
    B.reset_modules(net, ["head.2"], optimizers=[opt])
    torch.manual_seed(7)
    expected = nn.Linear(8, 2)  # same init scheme, same random draws
    assert torch.equal(net.head[2].weight, expected.weight) and torch.equal(net.head[2].bias, expected.bias)

    def factory():
        layer = nn.Linear(8, 2)
        nn.init.orthogonal_(layer.weight, 0.01)
        nn.init.zeros_(layer.bias)
        return layer

    B.reset_modules(net, ["head.2"], make_fresh={"head.2": factory})
    assert float(net.head[2].bias.detach().abs().max()) == 0.0
    assert float(net.head[2].weight.detach().abs().max()) < 0.05


def test_reset_of_an_injected_head_resets_only_trainable_terms():
    net, opt, x, _ = _trained()
    B.inject_plasticity(net, ["head"], x, optimizers=[opt])
    frozen = [copy.deepcopy(t.state_dict()) for t in frozen_terms(net.head)]
    trainable = copy.deepcopy(trainable_terms(net.head)[0].state_dict())
    B.reset_modules(net, ["head"], optimizers=[opt])
    for t, sd in zip(frozen_terms(net.head), frozen):
        assert all(torch.equal(v, t.state_dict()[k]) for k, v in sd.items())
    new = trainable_terms(net.head)[0].state_dict()
    assert not any(torch.equal(v, new[k]) for k, v in trainable.items())


class Wrapped(nn.Module):  # the whole Net at `net`, so the head is `net.head`
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(x)


def test_a_part_inside_an_injected_module_names_that_part_of_each_trainable_term():
    torch.manual_seed(0)
    model, x = Wrapped(), torch.rand(16, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = copy.deepcopy(model)
    B.inject_plasticity(model, ["net"], x, targets=[target], optimizers=[opt])  # inject all, then reset the head
    (model(x) ** 2).mean().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = B.reset_modules(model, ["net.head"], optimizers=[opt], targets=[target])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith("net.terms.1.head.")}  # θ'1's head only
    assert log["interventions/reset_params"] == sum(p.numel() for p in model.net.terms[1].head.parameters())
    assert all(p not in opt.state for p in model.net.terms[1].head.parameters())
    assert all(torch.equal(target.get_parameter(n), model.get_parameter(n)) for n in changed)
    B.shrink_perturb(model, ["net.encoder"], shrink=0.5, perturb=0.0, targets=[target])
    halved = model.net.terms[1].encoder[0].weight
    assert torch.equal(halved, 0.5 * before["net.terms.1.encoder.0.weight"])
    assert torch.equal(model.net.terms[0].encoder[0].weight, before["net.terms.0.encoder.0.weight"])  # frozen


# -- shrink-and-perturb ---------------------------------------------------------------------------
def test_shrink_perturb_identity_is_a_no_op():
    net, _, _, _ = _trained()
    before = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    log = B.shrink_perturb(net, shrink=1.0, perturb=0.0)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.get_rng_state())  # no random numbers drawn
    assert log["interventions/shrink_perturb_rel_change"] == 0.0


def test_shrink_perturb_is_s_theta_plus_p_eps():
    net, _, _, _ = _trained()
    target = copy.deepcopy(net)
    before = copy.deepcopy(net.state_dict())
    s, p = 0.8, 0.01
    torch.manual_seed(3)
    B.shrink_perturb(net, ("",), shrink=s, perturb=p, targets=[target])
    torch.manual_seed(3)
    eps = copy.deepcopy(net)
    for m in eps.modules():  # the fresh initialisation, drawn the same way
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for k, e in eps.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], s * before[k] + p * e, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(target.state_dict()[k], net.state_dict()[k], rtol=0, atol=0)
    # statistically: with S=1 the change of a weight matrix has the scale of P times its init
    torch.manual_seed(4)
    big = nn.Sequential(nn.Linear(400, 400))
    w0 = big[0].weight.detach().clone()
    B.shrink_perturb(big, shrink=1.0, perturb=0.01)
    bound = 1 / math.sqrt(400)  # default init: U(-b, b), std b/sqrt(3)
    assert float((big[0].weight.detach() - w0).std()) == pytest.approx(0.01 * bound / math.sqrt(3), rel=0.02)


def test_shrink_perturb_on_a_path_leaves_the_rest_and_frozen_terms():
    net, opt, x, _ = _trained()
    B.inject_plasticity(net, ["head"], x, optimizers=[opt])
    frozen = [copy.deepcopy(t.state_dict()) for t in frozen_terms(net.head)]
    encoder = copy.deepcopy(net.encoder.state_dict())
    trainable = copy.deepcopy(trainable_terms(net.head)[0].state_dict())
    B.shrink_perturb(net, ["head"], shrink=0.5, perturb=0.01)
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder.items())
    for t, sd in zip(frozen_terms(net.head), frozen):
        assert all(torch.equal(v, t.state_dict()[k]) for k, v in sd.items())
    new = trainable_terms(net.head)[0].state_dict()
    assert all(not torch.equal(v, new[k]) for k, v in trainable.items())


# -- L2 --------------------------------------------------------------------------------------------
def test_l2_schedules():
    def coef(schedule, step, total):
        args = types.SimpleNamespace(
            l2_schedule=schedule, l2_coef=1e-3, l2_start=1e-4, l2_end=5e-4, l2_period_on=500, l2_period_off=100
        )
        return B.l2_coef(args, step, total)

    assert coef("none", 123, 1000) == 0.0
    assert coef("constant", 0, 1000) == coef("constant", 999, 1000) == 1e-3
    assert coef("incremental", 0, 1000) == pytest.approx(1e-4)
    assert coef("incremental", 500, 1000) == pytest.approx(3e-4)
    assert coef("incremental", 1000, 1000) == pytest.approx(5e-4)
    assert all(coef("periodic", s, 10_000) == 1e-3 for s in [0, 499, 600, 1099, 1200])
    assert all(coef("periodic", s, 10_000) == 0.0 for s in [500, 599, 1100, 1199])


def test_l2_penalty_is_the_hand_sum_of_trainable_weights():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
        lin.bias.copy_(torch.tensor([10.0, 10.0]))  # biases are not penalised
    model = nn.Sequential(lin, nn.LayerNorm(2), nn.Linear(2, 1))
    with torch.no_grad():
        model[2].weight.fill_(2.0)
    assert B.l2_penalty(model).item() == pytest.approx(1 + 4 + 9 + 0.25 + 4 + 4)
    model[2].weight.requires_grad_(False)  # frozen weights are not penalised
    assert B.l2_penalty(model).item() == pytest.approx(14.25)
    # the loss includes the term: its gradient is the base gradient + 2 λ w
    x, lam = torch.rand(4, 2), 0.1
    base = model(x).pow(2).mean()
    g_base = torch.autograd.grad(base, lin.weight)[0]
    total = model(x).pow(2).mean() + lam * B.l2_penalty(model)
    g_total = torch.autograd.grad(total, lin.weight)[0]
    torch.testing.assert_close(g_total, g_base + 2 * lam * lin.weight.detach())


# -- normalised / leaky networks ----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["1", "0.linear", "0"])
def test_layer_norm_leaky_relu_networks_support_injection(path):
    torch.manual_seed(0)
    encoder = nn.Module()
    encoder.cnn = nn.Sequential(nn.Conv2d(4, 8, 8, 4), nn.GroupNorm(1, 8), nn.LeakyReLU(0.01), nn.Flatten())
    encoder.linear = nn.Sequential(nn.Linear(8 * 8 * 8, 64), nn.LayerNorm(64), nn.LeakyReLU(0.01))
    encoder.forward = lambda x: encoder.linear(encoder.cnn(x))
    head = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.LeakyReLU(0.01), nn.Linear(32, 3))
    model = nn.Sequential(encoder, head)
    x = torch.rand(6, 4, 36, 36)
    with torch.no_grad():
        before = model(x)
    log = B.inject_plasticity(model, [path], x)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert log["injection/output_change"] == 0.0
    assert log["injection/trainable_params"] == log["injection/trainable_params_before"]


# -- adaptive trigger -------------------------------------------------------------------------------
def test_adaptive_trigger_fires_on_crossing_and_respects_gap_and_count():
    key = "plasticity/erank_features_mean"
    args = Flags(
        adaptive_inject_metric=key,
        adaptive_inject_threshold=15.0,
        adaptive_inject_min_gap=100,
        adaptive_inject_max_count=2,
    )
    fired = []
    series = {0: 5.0, 20: 20.0, 40: 12.3, 60: 10.0, 139: 9.0, 140: 16.0, 160: 14.0, 300: 1.0}
    reasons = {s: B.adaptive_injection_due(args, s, {key: v}, fired, start_step=10) for s, v in series.items()}
    assert reasons[0] is None  # before start_step
    assert reasons[20] is None  # not crossed
    assert reasons[40] == f"{key}=12.3 < 15 at step 40"
    assert reasons[60] is None and reasons[139] is None  # within the gap
    assert reasons[140] is None  # gap passed, but not crossed
    assert reasons[160] is not None and reasons[300] is None  # second fire, then max_count reached
    assert fired == [40, 160]
    resumed = list(fired)  # a resumed run continues from the saved list
    assert B.adaptive_injection_due(args, 400, {key: 0.0}, resumed) is None and resumed == [40, 160]
    up = Flags(
        adaptive_inject_metric="plasticity/dormant_ratio_mean",
        adaptive_inject_threshold=0.5,
        adaptive_inject_direction="above",
    )
    assert B.adaptive_injection_due(up, 1, {"plasticity/dormant_ratio_mean": 0.5}, []) is None
    assert "> 0.5" in B.adaptive_injection_due(up, 2, {"plasticity/dormant_ratio_mean": 0.6}, [])
    typo = Flags(adaptive_inject_metric="plasticity/dormant_ratio", adaptive_inject_threshold=0.5)
    with pytest.raises(B.UserError, match="did you mean .*plasticity/dormant_ratio_mean"):  # caught before training
        B.check_intervention_args(typo, 1000, metric_keys={"plasticity/dormant_ratio_mean"})
    assert B.adaptive_injection_due(Flags(), 0, {key: 0.0}, []) is None  # no threshold: no trigger


# -- flag validation ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Flags(B.PlasticityArgs):
    learning_rate: float = B.bounded(1e-3, above=0)  # a script's own bounded flag is checked the same way
    fraction: float = B.bounded(0.5, above=0, below=1)
    count: int = B.bounded(3, min=2.5)  # an int compared with a float bound


@pytest.mark.parametrize(
    "bad, flag",
    [
        (dict(metrics_every=-1), "--metrics-every"),
        (dict(metrics_batch_size=1), "--metrics-batch-size"),
        (dict(dormant_tau=-0.1), "--dormant-tau"),
        (dict(dormant_tau=1.5), "--dormant-tau"),
        (dict(reset_at=[10_000]), "--reset-at"),
        (dict(shrink_perturb_at=[5, 5]), "--shrink-perturb-at"),
        (dict(sp_perturb=-0.01), "--sp-perturb"),
        (dict(sp_shrink=float("nan")), "--sp-shrink"),
        (dict(l2_coef=-1.0), "--l2-coef"),
        (dict(l2_period_on=0), "--l2-period-on"),
        (dict(l2_period_off=-5), "--l2-period-off"),
        (dict(learning_rate=0.0), "--learning-rate"),
        (dict(learning_rate=float("inf")), "--learning-rate"),
        (dict(fraction=1.0), "--fraction 1.0 is invalid: it must be a finite number > 0 and < 1"),
        (dict(fraction=0), "--fraction"),
        (dict(count=2), "--count 2 is invalid: it must be a finite number >= 2.5"),
        (dict(adaptive_inject_threshold=3.0), "--adaptive-inject-metric"),
        (dict(adaptive_inject_metric="plasticity/erank_features_mean"), "--adaptive-inject-threshold"),
        (dict(adaptive_inject_metric="m", adaptive_inject_threshold=float("nan")), "--adaptive-inject-threshold"),
        (
            dict(adaptive_inject_metric="m", adaptive_inject_threshold=1.0, adaptive_inject_max_count=0),
            "--adaptive-inject-max-count",
        ),
        (
            dict(adaptive_inject_metric="m", adaptive_inject_threshold=1.0, adaptive_inject_min_gap=-1),
            "--adaptive-inject-min-gap",
        ),
        (dict(adaptive_inject_metric="m", adaptive_inject_threshold=1.0, metrics_every=0), "--metrics-every"),
    ],
)
def test_flag_checks_name_the_flag(bad, flag):
    B.check_ranges(Flags())  # the defaults are valid
    B.check_intervention_args(Flags(), 1000)
    with pytest.raises(B.UserError, match=flag):
        B.check_ranges(Flags(**bad))  # each script calls both, before anything is written
        B.check_intervention_args(Flags(**bad), 1000)


@pytest.mark.parametrize(
    "argv", [["--l2-schedule", "cosine"], ["--activation", "gelu"], ["--adaptive-inject-direction", "sideways"]]
)
def test_choices_are_checked_by_their_types(argv, capsys):
    with pytest.raises(SystemExit) as e:
        tyro.cli(Flags, args=argv)
    assert e.value.code != 0 and argv[0] in capsys.readouterr().err


def test_check_intervention_args_validates_the_metric_name():
    keys = B.plasticity_keys(Net())
    ok = Flags(adaptive_inject_metric="plasticity/erank_features_mean", adaptive_inject_threshold=3.0)
    B.check_intervention_args(ok, 1000, metric_keys=keys)
    bad = Flags(adaptive_inject_metric="plasticity/erank_mean", adaptive_inject_threshold=3.0)
    with pytest.raises(B.UserError, match="--adaptive-inject-metric 'plasticity/erank_mean'"):
        B.check_intervention_args(bad, 1000, metric_keys=keys)
