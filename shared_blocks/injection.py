# Plasticity injection (Nikishin et al., NeurIPS 2023), generic over any nn.Module head.
#
#   f(x) = h_θ(x) + h_θ'1(x) − h_θ'2(x)
#
# h_θ is the head as trained so far (frozen); θ'1 and θ'2 are two copies of ONE fresh
# initialisation, θ'1 trainable and θ'2 frozen. At the injection step the output is unchanged
# (θ'1 = θ'2) and the number of trainable parameters is unchanged. Injecting again freezes
# everything trainable in the head and adds a new pair (double / multiple injection).
# The whole injection state (terms, signs, which terms are frozen) lives in buffers, so a
# state_dict describes the injected network completely; `load_injected_state_dict` rebuilds it.
import copy as _copy
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn


class InjectedModule(nn.Module):
    """y(x) = term_0(x) + Σ_k (term_2k+1(x) − term_2k+2(x)): the head, then one pair per injection.

    When the input carries no gradient (e.g. raw observations, or an encoder that is itself
    frozen), the frozen terms run under `torch.no_grad()`; their outputs can also be computed once
    with `frozen_outputs` and passed back as `forward(x, frozen_out=...)` to avoid recomputation.
    When the input does carry a gradient (a shared trainable encoder), all terms are part of the
    graph, so gradients from every term still reach the encoder, but frozen parameters get none.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.terms = nn.ModuleList([original])
        self.register_buffer("signs", torch.ones(1))
        self.register_buffer("term_trainable", torch.ones(1, dtype=torch.bool))
        self.register_buffer("injection_count", torch.zeros((), dtype=torch.long))
        self._sync_python_flags()

    def _sync_python_flags(self) -> None:
        # Python mirrors of the buffers, so forward() never syncs with an accelerator.
        self._signs = [float(s) for s in self.signs]
        self._trainable = [bool(t) for t in self.term_trainable]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_python_flags()

    # -- structure -----------------------------------------------------------------------
    def add_term(self, module: nn.Module, sign: float, trainable: bool) -> None:
        for p in module.parameters():
            p.requires_grad_(trainable)
        self.terms.append(module)
        dev = self.signs.device
        self.signs = torch.cat([self.signs, torch.tensor([float(sign)], device=dev)])
        self.term_trainable = torch.cat([self.term_trainable, torch.tensor([trainable], device=dev)])
        self._sync_python_flags()

    def set_term_trainable(self, i: int, trainable: bool) -> None:
        for p in self.terms[i].parameters():
            p.requires_grad_(trainable)
        self.term_trainable[i] = trainable
        self._sync_python_flags()

    def apply_trainable_mask(self) -> None:
        """Set requires_grad of every term from the saved `term_trainable` buffer."""
        self._sync_python_flags()
        for term, trainable in zip(self.terms, self._trainable):
            for p in term.parameters():
                p.requires_grad_(trainable)

    def frozen_terms(self) -> List[nn.Module]:
        return [t for t, tr in zip(self.terms, self._trainable) if not tr]

    def trainable_terms(self) -> List[nn.Module]:
        return [t for t, tr in zip(self.terms, self._trainable) if tr]

    # -- forward ---------------------------------------------------------------------------
    def frozen_outputs(self, x: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Output of every frozen term (None for trainable ones); reusable via forward(frozen_out=)."""
        need_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.set_grad_enabled(need_graph):
            return [None if tr else term(x) for term, tr in zip(self.terms, self._trainable)]

    def forward(self, x: torch.Tensor, frozen_out: Optional[List[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        outs = self.frozen_outputs(x) if frozen_out is None else frozen_out
        ys = [y if y is not None else term(x) for y, term in zip(outs, self.terms)]
        # Evaluate as h + (h'1 − h'2) + (h''1 − h''2) + ...: each pair is exactly 0 when injected,
        # so the output is bit-for-bit unchanged at the injection step.
        out, i, n = ys[0], 1, len(ys)
        while i < n:
            if i + 1 < n and self._signs[i] == 1.0 and self._signs[i + 1] == -1.0:
                out = out + (ys[i] - ys[i + 1])
                i += 2
            else:
                out = out.add(ys[i], alpha=self._signs[i])
                i += 1
        return out


def fresh_like(module: nn.Module) -> nn.Module:
    """A fresh copy of `module` drawn with its own init scheme (`reset_parameters` of every layer)."""
    if isinstance(module, InjectedModule):
        module = module.terms[0]
    fresh = _copy.deepcopy(module)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for p in fresh.parameters():
        p.requires_grad_(True)
    return fresh


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError("cannot inject into the root module itself: wrap it and give a sub-module path")
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def inject(
    model: nn.Module,
    path: str,
    *,
    fresh: Optional[nn.Module] = None,
    make_fresh: Optional[Callable[[], nn.Module]] = None,
    keep_trainable: bool = False,
    third_term: bool = True,
) -> nn.Module:
    """Inject plasticity into the sub-module `model.<path>` in place; return the fresh module used.

    fresh:          use these exact values for the new pair (to mirror a target network).
    make_fresh:     factory for the fresh head (default: deepcopy + reset_parameters).
    keep_trainable: ablation, every term stays trainable (old head, θ'1 and θ'2).
    third_term:     False is the ablation without −h_θ'2: the output jumps at injection.
    """
    head = model.get_submodule(path)
    device = next(head.parameters()).device
    if not isinstance(head, InjectedModule):
        head = InjectedModule(head).to(device)
        _set_submodule(model, path, head)
    if not keep_trainable:
        for i in range(len(head.terms)):
            head.set_term_trainable(i, False)
    if fresh is None:
        fresh = make_fresh() if make_fresh is not None else fresh_like(head)
    fresh = fresh.to(device)
    head.add_term(_copy.deepcopy(fresh), +1.0, trainable=True)
    if third_term:
        head.add_term(_copy.deepcopy(fresh), -1.0, trainable=keep_trainable)
    head.injection_count += 1
    return fresh


def injection_counts(model: nn.Module) -> Dict[str, int]:
    return {n: int(m.injection_count) for n, m in model.named_modules() if isinstance(m, InjectedModule)}


def load_injected_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """Load a state_dict saved from an injected model into a freshly built (un-injected) model.

    The injected structure (number of terms, signs, frozen flags) is read from the state_dict's
    buffers, rebuilt with placeholder terms, then every value is loaded, so the reloaded model
    computes the same function and trains the same parameters.
    """
    for key, signs in state_dict.items():
        if not key.endswith(".signs") or key[: -len("signs")] + "injection_count" not in state_dict:
            continue
        path = key[: -len(".signs")]
        head = model.get_submodule(path)
        if not isinstance(head, InjectedModule):
            head = InjectedModule(head).to(signs.device)
            _set_submodule(model, path, head)
        while len(head.terms) < len(signs):
            head.add_term(_copy.deepcopy(head.terms[0]), 1.0, trainable=True)
    result = model.load_state_dict(state_dict, strict=strict)
    for m in model.modules():
        if isinstance(m, InjectedModule):
            m.apply_trainable_mask()
    return result


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def refresh_optimizer(
    optimizer: torch.optim.Optimizer,
    replaced: List[tuple] = (),
    reset_state: bool = False,
) -> None:
    """Re-point `optimizer` after an injection.

    replaced: (ids of the head's trainable parameters before injection, new trainable parameters)
    pairs: the new parameters join the param group that held the old ones, with fresh state.
    Parameters that are now frozen leave the optimizer with their state. Surviving parameters
    (e.g. the shared encoder) keep their Adam moments unless `reset_state`, which clears the state
    of every parameter (moments and step counts back to zero).
    """
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        for old_ids, new_params in replaced:
            if ids & set(old_ids):
                group["params"].extend(p for p in new_params if id(p) not in ids)
        for p in group["params"]:
            if not p.requires_grad:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if p.requires_grad]
    if reset_state:
        optimizer.state.clear()


def _flat_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().flatten()
    return torch.cat([_flat_output(o) for o in out])


@torch.no_grad()
def _probe_output(model: nn.Module, probe, forward: Optional[Callable]) -> torch.Tensor:
    return _flat_output(forward(model, probe) if forward is not None else model(probe))


def apply_injection(
    model: nn.Module,
    paths: Iterable[str],
    probe,
    *,
    targets: Iterable[nn.Module] = (),
    optimizers: Iterable[torch.optim.Optimizer] = (),
    reset_optimizer: bool = False,
    make_fresh: Optional[Dict[str, Callable[[], nn.Module]]] = None,
    keep_trainable: bool = False,
    third_term: bool = True,
    forward: Optional[Callable] = None,
) -> Dict[str, float]:
    """Inject into each `paths` entry of `model`, mirror the SAME fresh values into every target
    network (same paths), re-point the optimizers, and return the values to log.

    injection/output_change is max |f_after(probe) − f_before(probe)|: 0 with the third term.
    """
    paths = list(paths)
    targets = list(targets)
    trainable_before = count_params(model, trainable_only=True)
    before = _probe_output(model, probe, forward)
    targets_before = [_probe_output(t, probe, forward) for t in targets]
    replaced = []
    for path in paths:
        old_ids = {id(p) for p in model.get_submodule(path).parameters() if p.requires_grad}
        factory = (make_fresh or {}).get(path)
        fresh = inject(model, path, make_fresh=factory, keep_trainable=keep_trainable, third_term=third_term)
        new = [p for p in model.get_submodule(path).parameters() if p.requires_grad and id(p) not in old_ids]
        replaced.append((old_ids, new))
        for t in targets:
            inject(t, path, fresh=fresh, keep_trainable=keep_trainable, third_term=third_term)
    for opt in optimizers:
        refresh_optimizer(opt, replaced, reset_state=reset_optimizer)
    after = _probe_output(model, probe, forward)
    log = {
        "injection/count": float(max(injection_counts(model).values())),
        "injection/output_change": float((after - before).abs().max()),
        "injection/trainable_params": float(count_params(model, trainable_only=True)),
        "injection/trainable_params_before": float(trainable_before),
        "injection/total_params": float(count_params(model)),
    }
    for k, (t, tb) in enumerate(zip(targets, targets_before)):
        log["injection/target_output_change" + (f"_{k}" if k else "")] = float(
            (_probe_output(t, probe, forward) - tb).abs().max()
        )
    return log
