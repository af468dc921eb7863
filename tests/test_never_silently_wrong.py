"""Bad input is an error, not a number; the optimizer estimates on the forward it should (issue 11, parts 4 and 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim import EWC, FisherAdam, NaturalGradient, diagonal_fisher, fisher_variance
from fisher_optim.batch import Batch, NonFiniteError

DT = torch.float64


def mlp(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)).to(DT)


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT)


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


# -- non-finite values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [diagonal_fisher, fisher_variance])
def test_nan_inputs_raise_naming_the_input(fn):
    x, _ = data()
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="positional input 0 has 1 non-finite"):
        fn(mlp(), x, likelihood="categorical", estimator="mc1")
    with pytest.raises(ValueError, match="keyword input 'x'"):
        _kw(fn, x)


def _kw(fn, x):
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, *, x):
            return self.net(x)

    return fn(Kw(), {"x": x}, likelihood="categorical", estimator="mc1")


def test_nonfinite_output_raises():
    net = mlp()
    with torch.no_grad():
        net[2].bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match="model output has 8 non-finite"):
        diagonal_fisher(net, data()[0], likelihood="categorical", estimator="exact")


def test_ewc_consolidate_on_nan_raises_and_keeps_no_task():
    x, y = data()
    x[0, 0] = float("nan")
    ewc = EWC(mlp(), likelihood="categorical", lam=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        ewc.consolidate(x)
    assert ewc.n_tasks == 0


def test_categorical_with_one_class_raises():
    with pytest.raises(ValueError, match="1 class.*gaussian"):
        diagonal_fisher(mlp(out=1), data()[0], likelihood="categorical", estimator="exact")


def test_a_fisher_zero_everywhere_warns():
    class Saturated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):  # depends on the weights, but through a constant shift of the logits
            return torch.zeros(x.shape[0], 3, dtype=x.dtype) + 0 * self.a(x).sum(1, keepdim=True)

    with pytest.warns(RuntimeWarning, match="exactly zero for every parameter"):
        diagonal_fisher(Saturated().to(DT), data()[0], likelihood="categorical", estimator="exact")


@pytest.mark.parametrize("opt_cls", [FisherAdam, NaturalGradient])
def test_a_nan_batch_in_a_batchnorm_model_is_skipped_and_training_goes_on(opt_cls):
    net = bn_net().train()
    opt = opt_cls(net, likelihood="categorical", estimator="exact", fisher_interval=1)
    x, y = data(16)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad()
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    bad = x.clone()
    bad[3] = float("nan")
    F.cross_entropy(net(bad), y).backward()  # writes NaN into the running statistics
    assert not bool(net[1].running_mean.isfinite().all())
    opt.step()
    opt.zero_grad()
    assert opt.fisher_report().skipped_steps == 1
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n  # the skipped step's forward is undone
    for n, p in net.named_parameters():
        assert torch.equal(p, params[n]), n
    for i in range(3):  # training goes on
        xi, yi = data(16, seed=i + 1)
        F.cross_entropy(net(xi), yi).backward()
        opt.step()
        opt.zero_grad()
    rep = opt.fisher_report()
    assert rep.skipped_steps == 1 and rep.steps == 4
    assert all(bool(p.isfinite().all()) for p in net.parameters())
    assert all(bool(b.isfinite().all()) for b in net.buffers() if b.is_floating_point())
    opt.close()


def test_nan_inputs_with_nonfinite_raise_raise_floating_point_error():
    net = mlp()
    opt = FisherAdam(net, likelihood="categorical", estimator="exact", nonfinite="raise")
    x, y = data()
    x[0, 0] = float("nan")
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(FloatingPointError, match="positional input 0"):
        opt.step()
    opt.close()


# -- which forward the optimizer estimates on ------------------------------------------------------------------------
class Spy:
    def __init__(self, monkeypatch):
        import fisher_optim.optim.base as base

        self.seen = []
        real = base.estimate_plan

        def spy(model, inputs, **kw):
            self.seen.append(inputs)
            return real(model, inputs, **kw)

        monkeypatch.setattr(base, "estimate_plan", spy)


def test_gradient_accumulation_gathers_the_micro_batches(monkeypatch):
    spy = Spy(monkeypatch)
    net = mlp()
    opt = FisherAdam(net, likelihood="categorical", estimator="exact")
    parts = [data(4, seed=s) for s in range(3)]
    whole = diagonal_fisher(net, torch.cat([x for x, _ in parts]), likelihood="categorical", estimator="exact")
    for x, y in parts:
        (F.cross_entropy(net(x), y) / 3).backward()
    opt.step()
    assert torch.equal(spy.seen[0].first, torch.cat([x for x, _ in parts]))
    beta2 = opt.param_groups[0]["betas"][1]
    for n, p in net.named_parameters():  # the first refresh is the Fisher of the whole accumulated batch
        torch.testing.assert_close(opt.state[p]["fisher_ema"] / (1 - beta2), whole[n], rtol=1e-10, atol=1e-15)
    opt.close()


def test_fisher_batch_caps_the_gathered_examples(monkeypatch):
    spy = Spy(monkeypatch)
    net = mlp()
    opt = FisherAdam(net, likelihood="categorical", estimator="exact", fisher_batch=6)
    parts = [data(4, seed=s) for s in range(3)]
    for x, y in parts:
        F.cross_entropy(net(x), y).backward()
    opt.step()
    assert torch.equal(spy.seen[0].first, torch.cat([x for x, _ in parts])[:6])
    opt.close()


def test_an_extra_forward_without_backward_is_not_taken(monkeypatch):
    spy = Spy(monkeypatch)
    net = mlp()
    opt = FisherAdam(net, likelihood="categorical", estimator="exact")
    x, y = data()
    F.cross_entropy(net(x), y).backward()
    net(torch.zeros(2, 4, dtype=DT))  # with gradients, never backpropagated (a metric)
    opt.step()
    assert torch.equal(spy.seen[0].first, x)
    opt.close()


def test_positional_and_keyword_arguments_are_replayed(monkeypatch):
    spy = Spy(monkeypatch)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(2, 3)

        def forward(self, x, z, *, gate):
            return self.a(x) + self.b(z) * gate

    net = Two().to(DT)
    opt = FisherAdam(net, likelihood="categorical", estimator="exact")
    x, y = data()
    z = torch.randn(8, 2, dtype=DT)
    gate = torch.tensor(0.5, dtype=DT)
    ref = diagonal_fisher(net, Batch((x, z), {"gate": gate}), likelihood="categorical", estimator="exact")
    F.cross_entropy(net(x, z, gate=gate), y).backward()
    opt.step()
    b = spy.seen[0]
    assert isinstance(b, Batch) and torch.equal(b.args[1], z) and torch.equal(b.kwargs["gate"], gate)
    beta2 = opt.param_groups[0]["betas"][1]
    for n, p in net.named_parameters():
        torch.testing.assert_close(opt.state[p]["fisher_ema"] / (1 - beta2), ref[n], rtol=1e-10, atol=1e-15)
    opt.close()


def test_layers_without_curvature_wait_for_it():
    """A zero-initialised head (torchvision's ViT): the Fisher below it is exactly zero at the first refresh. Those
    layers take no clipped 1/eps sign step; the next step refreshes again and they move once the head has."""
    net = mlp()
    with torch.no_grad():
        net[2].weight.zero_()
        net[2].bias.zero_()
    opt = FisherAdam(net, likelihood="categorical", estimator="exact", fisher_interval=10)
    x, y = data()
    first = net[0].weight.detach().clone()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad()
    assert not torch.equal(net[2].weight, torch.zeros_like(net[2].weight))  # the head moved
    F.cross_entropy(net(x), y).backward()
    opt.step()
    assert opt.fisher_report().refreshes == 2  # refreshed again at once (interval 10)
    assert not torch.equal(net[0].weight, first)
    opt.close()


def test_a_parameter_without_gradient_does_not_force_refreshes():
    """An unused parameter (zero Fisher, no gradient) must not turn every step into a refresh."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.spare = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x):
            return self.net(x)

    model = Unused()
    opt = FisherAdam(model, likelihood="categorical", estimator="exact", fisher_interval=10)
    x, y = data()
    for _ in range(5):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert opt.fisher_report().refreshes == 1
    opt.close()
