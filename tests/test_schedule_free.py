"""ScheduleFreeFisherAdam: the y/z/x bookkeeping against a hand-written float64 reference, the Fisher estimated at
y (a test that fails at z or x), train/eval, foreach against for-loop, bad input (checkpoints: test_optim.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_optim import batch, make_mlp, train  # the same small model, batches and loop as FisherAdam's tests
from torch import nn

from fisher_optim import ScheduleFreeFisherAdam, diagonal_fisher

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(model, steps, *, lr, beta, beta2, eps, wd, clip, signal, signal_beta, warmup, r, power, floor, interval,
              seed):  # fmt: skip
    """Schedule-Free as Defazio et al. write it, with three explicit points z, x, y (float64):
    y = (1-beta) z + beta x; u = clip(g(y) / (sqrt(F/B + signal m_hat^2) + eps)) + wd y; z -= lr_t u;
    x = (1-c) x + c z, c = (t^r lr_max^power) / sum.  The Fisher: mc1 at y every ``interval`` steps."""
    params = dict(model.named_parameters())
    z = {n: p.detach().clone() for n, p in params.items()}
    x = {n: p.detach().clone() for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    fbar = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    k = 0
    weight_sum, lr_max = 0.0, -1.0
    for t in range(1, steps + 1):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_((1 - beta) * z[n] + beta * x[n])  # y
        xb, yb = batch(t - 1)
        model.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        if (t - 1) % interval == 0:
            est = diagonal_fisher(model, xb, likelihood="categorical", estimator="mc1", generator=gen)
            k += 1
            for n in params:
                fbar[n] = beta2 * fbar[n] + (1 - beta2) * est[n]
        lr_t = lr * (min(1.0, t / warmup) if warmup else 1.0)
        lr_max = max(lr_max, lr_t)
        weight = t**r * lr_max**power
        weight_sum += weight
        c = weight / weight_sum
        with torch.no_grad():
            for n, p in params.items():
                g = p.grad
                f = (fbar[n] / (1 - beta2**k)).clamp_min(0)
                if floor > 0:
                    f = torch.maximum(f, floor * f.mean())
                f = f / xb.shape[0]
                if signal:
                    m[n] = signal_beta * m[n] + (1 - signal_beta) * g
                    f = f + (m[n] / (1 - signal_beta**t)) ** 2
                u = g / (f.sqrt() + eps)
                if clip is not None:
                    u = u.clamp(-clip, clip)
                u = u + wd * p
                z[n] = z[n] - lr_t * u
                x[n] = (1 - c) * x[n] + c * z[n]
    y = {n: ((1 - beta) * z[n] + beta * x[n]) for n in params}
    return y, x, z


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # defaults: clip 1, no signal term
        dict(signal=True, clip=None, warmup_steps=3, weight_decay=0.05),
        dict(clip=0.2, betas=(0.8, 0.7), floor=0.1),
    ],
)
def test_bookkeeping_matches_reference(kw):
    hp = dict(lr=0.05, betas=(0.9, 0.8), eps=1e-8, weight_decay=0.0, clip=1.0, signal=False, warmup_steps=0,
              floor=0.0)  # fmt: skip
    hp.update(kw)
    y_ref, x_ref, z_ref = reference(
        make_mlp(), 6, lr=hp["lr"], beta=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"], wd=hp["weight_decay"],
        clip=hp["clip"], signal=hp["signal"], signal_beta=hp["betas"][0], warmup=hp["warmup_steps"], r=0.0,
        power=2.0, floor=hp["floor"], interval=2, seed=3,
    )  # fmt: skip
    net = make_mlp()
    opt = ScheduleFreeFisherAdam(net, estimator="mc1", fisher_interval=2, seed=3, **hp)
    train(net, opt, 6)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), y_ref[n], rtol=1e-12, atol=1e-14, msg=lambda s: f"y {n}: {s}")
        torch.testing.assert_close(opt.state[p]["z"], z_ref[n], rtol=1e-12, atol=1e-14, msg=lambda s: f"z {n}: {s}")
    opt.eval()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), x_ref[n], rtol=1e-10, atol=1e-12, msg=lambda s: f"x {n}: {s}")
    opt.train()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), y_ref[n], rtol=1e-10, atol=1e-12, msg=lambda s: f"y again {n}: {s}")
    opt.close()


def test_fisher_is_estimated_at_y():
    """After a few steps y, x and z differ; the next refresh's estimate is the exact Fisher at y, and not the one
    at z or at x (which differ from it by far more than the tolerance: the test fails at the wrong point)."""
    net = make_mlp()
    opt = ScheduleFreeFisherAdam(net, lr=0.2, estimator="exact", fisher_interval=3, betas=(0.9, 0.5))
    train(net, opt, 3)  # refreshes at step 0; the next one at step 3
    xb, yb = batch(3)
    y_pt = {n: p.detach().clone() for n, p in net.named_parameters()}
    z_pt = {n: opt.state[p]["z"].clone() for n, p in net.named_parameters()}
    opt.eval()
    x_pt = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.train()

    def fisher_at(point):
        copy = make_mlp()
        copy.load_state_dict(point)
        return diagonal_fisher(copy, xb, likelihood="categorical", estimator="exact")

    at_y, at_z, at_x = fisher_at(y_pt), fisher_at(z_pt), fisher_at(x_pt)
    before = {n: opt.state[p]["fisher_ema"].clone() for n, p in net.named_parameters()}
    nn.functional.cross_entropy(net(xb), yb).backward()
    opt.step()
    for n, p in net.named_parameters():
        new = (opt.state[p]["fisher_ema"] - 0.5 * before[n]) / 0.5
        torch.testing.assert_close(new, at_y[n], rtol=1e-12, atol=1e-15, msg=lambda s: f"{n}: {s}")
    gap = lambda a: max(float((a[n] - at_y[n]).abs().max() / at_y[n].abs().max()) for n in at_y)  # noqa: E731
    assert gap(at_z) > 1e-3 and gap(at_x) > 1e-4  # the other points are distinguishable
    opt.close()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(), dict(signal=True, clip=None, weight_decay=0.01)])
def test_foreach_matches_forloop(dtype, kw):
    runs = []
    for foreach in (False, True):
        net = make_mlp(dtype=dtype)
        opt = ScheduleFreeFisherAdam(net, estimator="mc1", fisher_interval=2, seed=1, foreach=foreach, **kw)
        train(net, opt, 5)
        opt.eval()
        runs.append(([p.detach().clone() for p in net.parameters()],
                     [opt.state[p]["z"].clone() for p in net.parameters()]))  # fmt: skip
        if dtype == torch.bfloat16:
            assert opt.state[net[0].weight]["z"].dtype == torch.float32
        opt.close()
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b)


def test_train_eval_modes_and_their_errors():
    net = make_mlp()
    opt = ScheduleFreeFisherAdam(net, estimator="exact")
    w0 = net[0].weight.detach().clone()
    opt.eval()  # before any step x = y = z: nothing to swap
    assert torch.equal(net[0].weight, w0) and not opt.training
    with torch.no_grad():
        net(batch(0)[0])
    x, y = batch(0)
    nn.functional.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match=r"eval mode .* call opt.train\(\)"):
        opt.step()
    assert torch.equal(net[0].weight, w0) and not opt.state  # nothing changed
    opt.train()
    opt.step()
    opt.zero_grad()
    with pytest.warns(UserWarning, match=r"call opt.eval\(\) before evaluating"):
        with torch.no_grad():
            net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        with torch.no_grad():
            net(x)
    opt.close()


def test_nonfinite_step_changes_nothing():
    net = make_mlp()
    opt = ScheduleFreeFisherAdam(net, estimator="exact")
    train(net, opt, 2)
    params = [p.detach().clone() for p in net.parameters()]
    zs = [opt.state[p]["z"].clone() for p in net.parameters()]
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    x, y = batch(5)
    nn.functional.cross_entropy(net(x), y).backward()
    net[0].weight.grad[0, 0] = math.nan
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))
    assert all(torch.equal(a, opt.state[p]["z"]) for a, p in zip(zs, net.parameters()))
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == group
    assert opt.fisher_report().skipped_steps == 1
    opt.close()


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(lr=-1e-3), r"Invalid learning rate: -0.001"),
        (dict(lr=math.nan), r"Invalid learning rate: nan"),
        (dict(betas=(1.0, 0.99)), r"Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), r"Invalid beta parameter at index 1: -0.1"),
        (dict(eps=-1.0), r"Invalid epsilon value: -1.0"),
        (dict(floor=-1.0), r"Invalid floor: -1.0"),
        (dict(clip=0.0), r"Invalid clip value: 0.0"),
        (dict(warmup_steps=-1), r"Invalid warmup_steps: -1"),
        (dict(weight_decay=math.inf), r"Invalid weight_decay value: inf"),
        (dict(units="per_input"), r"Invalid units: 'per_input'"),
    ],
)
def test_invalid_hyperparameters(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ScheduleFreeFisherAdam(make_mlp(), **kwargs)


def test_with_ewc_the_anchor_is_x():
    """EWC on top: the penalty's gradient is part of the step, and consolidating in eval mode anchors at x, the
    average Schedule-Free evaluates (the consolidation forward is the library's own: not captured, no warning)."""
    from fisher_optim import EWC

    net = make_mlp()
    opt = ScheduleFreeFisherAdam(net, estimator="exact")
    ewc = EWC(net, likelihood="categorical", lam=10.0)
    for task in range(2):
        for i in range(3):
            xb, yb = batch(10 * task + i)
            (nn.functional.cross_entropy(net(xb), yb) + ewc.penalty()).backward()
            opt.step()
            opt.zero_grad()
        opt.eval()
        x_pt = [p.detach().clone() for p in net.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ewc.consolidate(batch(99)[0])
        opt.train()
        assert float(ewc.penalty().detach()) > 0  # the anchor is x, and the parameters hold y again
        opt.eval()
        assert all(torch.equal(a, b) for a, b in zip(x_pt, net.parameters()))
        opt.train()
    assert opt.fisher_report().skipped_steps == 0
    opt.close()
