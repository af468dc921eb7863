"""diagonal_fisher leaves the model as it found it: hooks, train/eval flags, buffers, .grad, parameters.

Checked after every estimator, after an exception raised inside the forward pass and after an exception raised
after it (bad targets), on models mixing fast layers, BatchNorm, Dropout and a general-route module.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE, assert_params_close, gen, init_, inputs
from reference import frozen_batch_statistics_copy
from torch import nn
from torch.nn.modules import module as module_mod

from fisher_optim import diagonal_fisher

pytestmark = pytest.mark.usefixtures("single_thread")

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


class Boom(nn.Module):
    """Identity unless armed; armed, it raises in the middle of the forward pass."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom inside forward")
        return x


def model_with_state():
    """Linear, BatchNorm1d, Dropout, a Boom, a LayerNorm (general route), mixed train/eval flags."""
    model = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), Boom(), nn.LayerNorm(5), nn.Linear(5, 3)
    )
    init_(model, seed=2)
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.randn(5, generator=gen(1), dtype=DTYPE))
        bn.running_var.copy_(1 + torch.rand(5, generator=gen(2), dtype=DTYPE))
        bn.num_batches_tracked.fill_(3)
    model.train()
    model[5].eval()  # flags differ per submodule and must come back exactly
    return model


def smooth_mlp():
    """A model mc2 supports (chain route), with Dropout in train mode."""
    model = init_(nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Dropout(0.3), nn.Linear(4, 3)), seed=3)
    return model.train()


def snapshot(model):
    return {
        "flags": [(n, m.training) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p._version, p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: (b.clone(), b._version) for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else (p.grad, p.grad.clone()) for n, p in model.named_parameters()},
        "hooks": {(n, d): dict(getattr(m, d)) for n, m in model.named_modules() for d in HOOK_DICTS if hasattr(m, d)},
        "tensor_hooks": {
            n: (p._backward_hooks, getattr(p, "_post_accumulate_grad_hooks", None)) for n, p in model.named_parameters()
        },
    }


def assert_unchanged(model, snap):
    after = snapshot(model)
    assert after["flags"] == snap["flags"]
    for n, (v, ver, rg) in snap["params"].items():
        v2, ver2, rg2 = after["params"][n]
        assert torch.equal(v, v2) and ver == ver2 and rg == rg2, n
    for n, (v, ver) in snap["buffers"].items():
        v2, ver2 = after["buffers"][n]
        assert torch.equal(v, v2) and ver == ver2, n
    for n, p in model.named_parameters():
        if snap["grads"][n] is None:
            assert p.grad is None, n
        else:
            obj, val = snap["grads"][n]
            assert p.grad is obj and torch.equal(p.grad, val), n
    assert after["hooks"] == snap["hooks"]
    assert after["tensor_hooks"] == snap["tensor_hooks"]
    for name in GLOBAL_HOOKS:
        assert len(getattr(module_mod, name, {})) == 0, name


def give_some_grads(model):
    """Half of the parameters get a .grad, the others keep None."""
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.grad = torch.randn(p.shape, generator=gen(i), dtype=DTYPE)


CALLS = {
    "exact": {},
    "mc1": {"n_samples": 2, "generator": gen(0)},
    "mc2": {"n_samples": 2, "generator": gen(0)},
    "empirical": {"targets": torch.tensor([0, 2, 1, 1])},
}


@pytest.mark.parametrize("estimator", list(CALLS))
def test_no_side_effects(estimator):
    model = smooth_mlp() if estimator == "mc2" else model_with_state()
    x = inputs((4, 3))
    give_some_grads(model)
    user_calls = []
    model[0].register_forward_hook(lambda *a: user_calls.append(1))  # a user's own hook stays and stays live
    snap = snapshot(model)
    kw = dict(CALLS[estimator])
    if "generator" in kw:
        kw["generator"] = gen(0)
    out = diagonal_fisher(model, x, likelihood="categorical", estimator=estimator, **kw)
    assert_unchanged(model, snap)
    assert all(not v.requires_grad and v.grad_fn is None for v in out.values())
    n_forward = len(user_calls)
    model(x)
    assert len(user_calls) == n_forward + 1


def test_train_mode_flags_do_not_change_the_result():
    """Dropout and BatchNorm in train mode: dropout is off, BatchNorm holds the batch's statistics; deterministic."""
    model = model_with_state()
    x = inputs((4, 3))
    a = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    a2 = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    b = diagonal_fisher(frozen_batch_statistics_copy(model, x), x, likelihood="categorical", estimator="exact")
    assert_params_close(a, a2, rtol=0, atol_scale=0)
    assert_params_close(a, b, rtol=1e-12)


def test_exception_inside_forward_cleans_up():
    model = model_with_state()
    x = inputs((4, 3))
    give_some_grads(model)
    snap = snapshot(model)
    model[4].armed = True
    for est, kw in CALLS.items():
        if est == "mc2":
            continue
        kw = {**kw, "generator": gen(0)} if "generator" in kw else kw
        with pytest.raises(RuntimeError, match="boom inside forward"):
            diagonal_fisher(model, x, likelihood="categorical", estimator=est, **kw)
        assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "kwargs,regex",
    [
        ({"estimator": "empirical", "targets": torch.tensor([0, 1, 2, 3])}, "out of range"),
        ({"estimator": "mc2", "generator": gen(0)}, r"'1' \(BatchNorm1d\) is not supported"),
    ],
    ids=["bad-targets", "mc2-unsupported"],
)
def test_exception_after_forward_cleans_up(kwargs, regex):
    model = model_with_state()
    x = inputs((4, 3))
    give_some_grads(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=regex):
        diagonal_fisher(model, x, likelihood="categorical", **kwargs)
    assert_unchanged(model, snap)


def test_under_no_grad_context():
    """Called under torch.no_grad() (as in an optimizer step) it still works and changes nothing."""
    model = smooth_mlp()
    x = inputs((4, 3))
    ref = diagonal_fisher(model, x, likelihood="categorical", estimator="mc2", generator=gen(1))
    snap = snapshot(model)
    with torch.no_grad():
        out = diagonal_fisher(model, x, likelihood="categorical", estimator="mc2", generator=gen(1))
    assert_params_close(out, ref, rtol=0, atol_scale=0)
    assert_unchanged(model, snap)
    assert torch.is_grad_enabled()
