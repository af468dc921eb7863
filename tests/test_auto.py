"""Auto selection among exact, Î₁ and Hutchinson (issue 14 part 4): Hutchinson where Î₁'s per-input variance is
heavy-tailed (a confident softmax), Î₁ kept where it wins, and the predicted variance matches the draws."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_optim import diagonal_fisher
from fisher_optim.engine import Probe
from fisher_optim.estimators import plan_from_probe
from fisher_optim.likelihoods import get_likelihood
from fisher_optim.selection import HutchMoments, run_selection
from fisher_optim.variance import OnlineVariance, factor_moments, moments_from_probe

pytestmark = pytest.mark.usefixtures("single_thread")


def confident_net(scale: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    with torch.no_grad():
        net[4].weight.mul_(scale)
        net[4].bias.zero_()
        net[4].bias[0] = scale  # one class dominates: p ~ (1-eps, eps, ...)
    return net


def x_of(m: int = 64) -> torch.Tensor:
    return torch.randn(m, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_hutchinson_chosen_for_a_confident_softmax():
    sel = run_selection(confident_net(8.0), x_of(), likelihood="categorical", cost_model="flops", target_rse=0.3)
    sampled = {c.estimator for c in sel.choices.values() if c.estimator != "exact"}
    assert sampled == {"hutchinson"}, sel.summary
    assert "Hutchinson over Î₁" in sel.summary
    for c in sel.choices.values():
        if c.estimator == "hutchinson":
            assert c.reason.startswith("Hutchinson with N=") and c.source == "closed form"
            assert c.rse < c.rse_mc1  # Î₁'s one-sample error is reported for comparison


def test_hutchinson_off_keeps_the_mc1_plan():
    sel = run_selection(confident_net(8.0), x_of(), likelihood="categorical", cost_model="flops", target_rse=0.3,
                        hutchinson=False)  # fmt: skip
    assert {c.estimator for c in sel.choices.values()} <= {"exact", "mc1"}


def test_hutchinson_variance_matches_its_draws():
    """The closed-form per-input variance 2(F^2 - sum A^4) that prices Hutchinson equals the sample variance of
    one-probe Hutchinson estimates (many draws)."""
    net, x = confident_net(2.0), x_of(4)
    lik = get_likelihood("categorical")
    with Probe(net, x, lik) as probe:
        mom = moments_from_probe(probe, with_v2=False, with_fisher_sq=True)
        var = HutchMoments(mom, factor_moments(probe)["a4"]).v1  # summed over the 4 inputs
        g = torch.Generator().manual_seed(0)
        plan = {n: ("hutchinson", 1) for n in probe.params}
        draws = [plan_from_probe(probe, plan, generator=g) for _ in range(3000)]
    for n in var:
        d = torch.stack([dr[n] for dr in draws])
        # the inputs' probes are independent, so the sum's variance is the sum of the per-input variances
        emp, pred = d.var(0).sum().item(), var[n].sum().item()
        assert emp == pytest.approx(pred, rel=0.1), n
        assert d.mean(0).sum().item() == pytest.approx(mom.fisher[n].sum().item(), rel=0.05)


def test_past_the_seed_budget_no_closed_form_pass(monkeypatch):
    """Past ``closed_form_seeds`` the selection runs no pass with the exact pass's seeds (the closed-form moments
    would raise here): the variances come from the draws (Î₁, Hutchinson; hutchinson_batch from those: online),
    each choice names its source, and the Fisher it returns is the draws' unbiased mean."""
    import fisher_optim.selection as sel_mod

    def boom(*a, **k):
        raise AssertionError("closed-form moments past the seed budget")

    monkeypatch.setattr(sel_mod, "moments_from_probe", boom)
    monkeypatch.setattr(sel_mod, "factor_moments", boom)
    net, x = confident_net(8.0), x_of()
    g = torch.Generator().manual_seed(0)
    sel = run_selection(net, x, likelihood="categorical", cost_model="flops", target_rse=0.3, closed_form_seeds=1,
                        generator=g)  # fmt: skip
    want = {"mc1": "online", "hutchinson": "online", "hutchinson_batch": "online", "exact": "exact"}
    assert all(c.source == want[c.estimator] for c in sel.choices.values())
    sampled = [c for c in sel.choices.values() if c.estimator != "exact"]
    assert sampled and all(f"variance: {c.source})" in c.reason for c in sampled)
    exact = diagonal_fisher(net, x, likelihood="categorical", estimator="exact")
    for n, f in sel.fisher.items():  # 8 one-probe draws per input: unbiased, within a few relative std
        assert ((f - exact[n]).norm() / exact[n].norm()).item() < 0.5, n


def test_online_tracker_converges_to_the_closed_form_and_is_named():
    net, x = confident_net(8.0), x_of(16)
    lik = get_likelihood("categorical")
    tracker = OnlineVariance()
    with Probe(net, x, lik) as probe:
        mom = moments_from_probe(probe, with_v2=False, with_fisher_sq=True)
        closed = HutchMoments(mom, factor_moments(probe)["a4"]).v1
        g = torch.Generator().manual_seed(3)
        plan = {n: ("hutchinson", 1) for n in probe.params}
        for _ in range(40):  # refreshes of 25 single-probe draws each
            tracker.update({n: torch.stack(v) for n, v in _stack([plan_from_probe(probe, plan, generator=g)
                                                                     for _ in range(25)]).items()})  # fmt: skip
    online = tracker.variance()
    for n in closed:
        assert online[n].sum().item() == pytest.approx(closed[n].sum().item(), rel=0.1), n
    kw = dict(likelihood="categorical", cost_model="flops", target_rse=0.3)
    sel_cf = run_selection(net, x, **kw)
    sel_on = run_selection(net, x, hutchinson_variance=online, **kw)
    hut = [c for c in sel_on.choices.values() if c.estimator == "hutchinson"]
    assert hut and all(c.source == "online" for c in hut)
    for n, c in sel_on.choices.items():  # the same plan, and predicted errors close to the closed form's
        assert (c.estimator, c.n_samples) == (sel_cf.choices[n].estimator, sel_cf.choices[n].n_samples)
        assert c.rse == pytest.approx(sel_cf.choices[n].rse, rel=0.1)


def _stack(draws):
    return {n: [d[n] for d in draws] for n in draws[0]}


@pytest.mark.parametrize(("lik_name", "masked"), [("categorical", False), ("categorical", True), ("bernoulli", False),
                                                  ("poisson", False)])  # fmt: skip
@pytest.mark.parametrize("linear_head", [True, False])
def test_factor_moments_against_brute_force(lik_name, linear_head, masked):
    """``factor_moments``' Fisher, squared Fisher and ΣA⁴ (A = JᵀS per input) against float64 ``torch.func``
    Jacobians; with a Linear head its statistics come from the output layer's closed form, without one (a Tanh
    after the head) from the seeded backward.  ``masked``: two inputs' targets are ``ignore_index`` (categorical),
    so they drop out."""
    from torch.func import functional_call, jacrev

    from fisher_optim.seeds import target_mask

    torch.manual_seed(0)
    layers = [nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)] + ([] if linear_head else [nn.Tanh()])
    net = nn.Sequential(*layers).double()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lik = get_likelihood(lik_name)
    with Probe(net, x, lik) as probe:
        assert (probe.output_index is not None) == linear_head
        targets = torch.tensor([0, -100, 1, 2, -100, 3])
        got = factor_moments(probe, mask=target_mask(probe, targets) if masked else None)
    params = {n: p.detach() for n, p in net.named_parameters()}
    want = {k: {n: torch.zeros_like(p) for n, p in params.items()} for k in ("fisher", "fisher_sq", "a4")}
    for m in range(len(x)):
        if masked and targets[m] == -100:
            continue
        h = net(x[m : m + 1]).detach()
        S = lik.fisher_factor(h)[0]  # C x K
        jac = jacrev(lambda p, xm=x[m : m + 1]: functional_call(net, p, (xm,))[0])(params)
        for n, p in params.items():
            A = torch.einsum("c...,ck->...k", jac[n], S)  # per coordinate, K columns
            f = (A * A).sum(-1)
            want["fisher"][n] += f
            want["fisher_sq"][n] += f * f
            want["a4"][n] += A.pow(4).sum(-1)
    for k in want:
        for n in params:
            torch.testing.assert_close(got[k][n], want[k][n], rtol=1e-10, atol=1e-14, msg=f"{k} {n}")


def test_batch_variance_from_hutchinson_equals_its_closed_form():
    """hutchinson_batch's variance 2(S² − ΣA⁴) = 2(S² − ΣF²) + Hutchinson's 2(ΣF² − ΣA⁴): given the exact moments,
    ``BatchMoments(hutchinson_var=...)`` is ``BatchMoments(a4=...)`` (float64)."""
    from fisher_optim.plan_search import BatchMoments

    net, x = confident_net(3.0), x_of(12)
    with Probe(net, x, get_likelihood("categorical")) as probe:
        mom = moments_from_probe(probe, with_v2=False, with_fisher_sq=True)
        a4 = factor_moments(probe)["a4"]
    closed = BatchMoments(mom, a4).v1
    derived = BatchMoments(mom, hutchinson_var=HutchMoments(mom, a4).v1).v1
    for n in closed:
        torch.testing.assert_close(derived[n], closed[n], rtol=1e-9, atol=1e-15)
        assert (closed[n] < 2 * mom.fisher[n].square() - 1e-12).any(), n  # tighter than the bound somewhere


def test_batch_variance_from_draws_is_unbiased():
    """From the draws (no exact pass): the mean over many selections of hutchinson_batch's ``v1`` (cross − pair
    + Hutchinson's online variance) approaches the closed form; each selection names it ``online``."""
    from fisher_optim.draws import SampledMoments, probe_draws
    from fisher_optim.plan_search import BatchMoments

    net, x = confident_net(3.0), x_of(12)
    with Probe(net, x, get_likelihood("categorical")) as probe:
        mom = moments_from_probe(probe, with_v2=False, with_fisher_sq=True)
        closed = BatchMoments(mom, factor_moments(probe)["a4"]).v1
        g = torch.Generator().manual_seed(5)
        tracker, acc, reps = OnlineVariance(), None, 400
        for _ in range(reps):
            d = probe_draws(probe, g)
            tracker.update(d.per_probe["hutchinson"])
            sm = SampledMoments(d.fisher(), d.pair, tracker.variance(), d.cross())
            v = BatchMoments(sm, hutchinson_var=tracker.variance()).v1
            acc = v if acc is None else {n: acc[n] + v[n] for n in v}
    for n in closed:
        got, want = acc[n].sum().item() / reps, closed[n].sum().item()
        assert got == pytest.approx(want, rel=0.15), n
