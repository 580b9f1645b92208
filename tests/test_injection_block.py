"""The injection block stands on its own: cut out of each script (and the canonical file) into a fresh module that
holds nothing else, it keeps every invariant of the method."""

import copy
import importlib.util
import types

import pytest
import torch
from conftest import ROOT
from torch import nn

spec = importlib.util.spec_from_file_location("sync_blocks", ROOT / "tools" / "sync_blocks.py")
sync_blocks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync_blocks)
SOURCES = ["shared_blocks/injection.py", *sync_blocks.SCRIPTS]


def extract_block(source: str) -> types.ModuleType:
    """The injection block alone, executed in an empty module (what a user gets by copying it)."""
    text = (ROOT / source).read_text()
    body = text if source.startswith("shared_blocks") else sync_blocks.blocks_in(text)["injection"]
    mod = types.ModuleType("copied_injection_block")
    exec(compile(body, f"<injection block of {source}>", "exec"), mod.__dict__)
    return mod


@pytest.fixture(params=SOURCES)
def blk(request):
    return extract_block(request.param)


class Net(nn.Module):
    """A shared encoder and a head, as in the paper."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.encoder(x))


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_steps(model, opt, x, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def setup(seed=0):
    torch.manual_seed(seed)
    net = Net()
    target = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(32, 4)
    train_steps(net, opt, x)
    return net, target, opt, x


def test_single_and_double_injection_keep_output_and_trainable_count(blk):
    net, target, opt, x = setup()
    for k in (1, 2):
        with torch.no_grad():
            before = net(x)
        n_before = n_trainable(net)
        log = blk.inject_plasticity(net, ["head"], x, targets=[target], sync_targets=True, optimizers=[opt])
        with torch.no_grad():
            assert torch.equal(net(x), before)  # bit for bit
            assert torch.equal(target(x), before)  # synced, then mirrored with the same fresh values
        assert n_trainable(net) == n_before
        assert log["injection/output_change"] == 0.0 and log["injection/count"] == k
        assert log["injection/target_output_change"] == 0.0
        assert int(net.head.injection_count) == k and len(net.head.terms) == 1 + 2 * k
        trainable = [t for t, tr in zip(net.head.terms, net.head._trainable) if tr]
        assert len(trainable) == 1 and trainable[0] is net.head.terms[-2]
        for a, b in zip(net.head.parameters(), target.head.parameters()):
            assert torch.equal(a, b)
        train_steps(net, opt, x)


def test_frozen_terms_stay_fixed_the_encoder_keeps_learning_and_frozen_params_have_no_grad(blk):
    net, _, opt, x = setup()
    blk.inject_plasticity(net, ["head"], x, optimizers=[opt])
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    encoder = {n: p.detach().clone() for n, p in net.encoder.named_parameters()}
    assert {n.split(".")[2] for n in frozen} == {"0", "2"}  # the old head and the frozen fresh copy
    train_steps(net, opt, x, steps=5)
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
    assert all(not torch.equal(p, encoder[n]) for n, p in net.encoder.named_parameters())
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in net.parameters() if p.requires_grad}
    # gradients reach the encoder through the frozen terms too
    net.zero_grad()
    net(x).sum().backward()
    g_all = net.encoder[0].weight.grad.clone()
    net.zero_grad()
    net.head.terms[-2](net.encoder(x)).sum().backward()
    assert not torch.allclose(g_all, net.encoder[0].weight.grad)


def test_optimizer_state_kept_or_reset(blk):
    net, _, opt, x = setup()
    steps = int(opt.state[net.encoder[0].weight]["step"])
    blk.inject_plasticity(net, ["head"], x, optimizers=[opt])
    assert int(opt.state[net.encoder[0].weight]["step"]) == steps  # the encoder keeps its Adam moments
    assert all(p not in opt.state for p in net.head.parameters())
    blk.inject_plasticity(net, ["head"], x, optimizers=[opt], reset_optimizer=True)
    assert len(opt.state) == 0


def test_ablations(blk):
    net, _, opt, x = setup()
    head_params = sum(p.numel() for p in net.head.parameters())
    before = n_trainable(net)
    blk.inject_plasticity(net, ["head"], x, optimizers=[opt], keep_trainable=True)
    assert n_trainable(net) == before + 2 * head_params  # old head, θ'1 and θ'2 all trainable
    net2, _, opt2, x2 = setup()
    log = blk.inject_plasticity(net2, ["head"], x2, optimizers=[opt2], third_term=False)
    assert log["injection/output_change"] > 0  # without −h_θ'2 the output jumps


def test_optimizer_groups_follow_model_order(blk):
    """New parameters join the group of those they replace; in each group the model's trainable parameters come in
    model order, in the slots the model's parameters held (another module's stay where they were)."""
    net, _, _, x = setup()
    net.aux, other = nn.Linear(16, 2), nn.Linear(3, 3)  # a head registered after the injected one; another module
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    opt = torch.optim.Adam([{"params": [*other.parameters(), *weights]}, {"params": biases, "lr": 1e-3}])
    for _ in (1, 2):
        blk.inject_plasticity(net, ["head"], x, optimizers=[opt])
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        assert [id(p) for p in opt.param_groups[0]["params"][:2]] == [id(p) for p in other.parameters()]
        assert [id(p) for p in opt.param_groups[0]["params"][2:]] == [id(p) for n, p in trainable if "weight" in n]
        assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for n, p in trainable if "bias" in n]


class Wrapper(nn.Module):
    """A whole network as a sub-module, and an output that is a tuple (as an actor-critic's)."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(x), self.net(x).sum(1)


def test_whole_network_custom_fresh_and_tuple_output(blk):
    wrapper = Wrapper()
    x = torch.randn(8, 4)
    with torch.no_grad():
        before = wrapper.net(x)
    made = []

    def make():
        made.append(Net())
        return made[-1]

    log = blk.inject_plasticity(wrapper, ["net"], x, make_fresh={"net": make})
    assert len(made) == 1 and log["injection/output_change"] == 0.0
    assert torch.equal(wrapper.net.terms[1].head[2].weight, made[0].head[2].weight)
    with torch.no_grad():
        assert torch.equal(wrapper.net(x), before)
    with pytest.raises(ValueError, match="root module"):
        blk.inject_plasticity(Net(), [""], x)


def test_injecting_around_an_injected_head_draws_the_original_architecture(blk):
    """A fresh copy of a network whose head was injected is the network as built, not a sum of random terms."""
    wrapper, x = Wrapper(), torch.randn(8, 4)
    blk.inject_plasticity(wrapper, ["net.head"], x)
    fresh = blk.fresh_copy(wrapper.net)
    assert not any(isinstance(m, blk.InjectedModule) for m in fresh.modules())
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in Net().named_parameters()]
    log = blk.inject_plasticity(wrapper, ["net"], x)  # the whole network, around the injected head
    assert log["injection/output_change"] == 0.0 and log["injection/count"] == 1.0
    reloaded = Wrapper()  # the inner head's θ'1, frozen with the rest of the old network, stays frozen on reload
    blk.load_injected_state_dict(reloaded, wrapper.state_dict())
    assert [p.requires_grad for p in reloaded.parameters()] == [p.requires_grad for p in wrapper.parameters()]
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], wrapper(x)[0])


def test_reload_of_an_injected_model_computes_the_same_function(blk, tmp_path):
    net, _, opt, x = setup()
    blk.inject_plasticity(net, ["head"], x, optimizers=[opt])
    train_steps(net, opt, x)
    blk.inject_plasticity(net, ["head"], x, optimizers=[opt])
    torch.save(net.state_dict(), tmp_path / "model.pt")
    fresh = Net()
    blk.load_injected_state_dict(fresh, torch.load(tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in net.parameters()]
    assert int(fresh.head.injection_count) == 2 and fresh.head._signs == net.head._signs


def test_the_block_needs_nothing_but_torch():
    for source in SOURCES:
        mod = extract_block(source)
        names = {k for k in vars(mod) if not k.startswith("__")}
        assert {"inject_plasticity", "load_injected_state_dict", "InjectedModule"} <= names, source
        imported = {k for k, v in vars(mod).items() if isinstance(v, types.ModuleType)}
        assert imported <= {"copy", "torch", "nn"}, (source, imported)
