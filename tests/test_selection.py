"""Tests of fisher_optim.selection: the choice is unchanged by the cheap cost model, the costs are reusable, and
the exact Fisher that the selection hands back equals ``diagonal_fisher(..., estimator="exact")`` (float64).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPE, init_, inputs, mlp
from torch import nn

from fisher_optim import costs as cost_mod
from fisher_optim import diagonal_fisher
from fisher_optim import selection as sel_mod
from fisher_optim.engine import Probe
from fisher_optim.likelihoods import get_likelihood
from fisher_optim.selection import Costs, run_selection, select

pytestmark = pytest.mark.usefixtures("single_thread")


def plan_of(choices):
    return {n: (c.estimator, c.n_samples) for n, c in choices.items()}


def sigmoid_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 4)).double()


def sigmoid_inputs(m: int = 64) -> torch.Tensor:
    return torch.randn(m, 6, generator=torch.Generator().manual_seed(1), dtype=DTYPE)


def layernorm_net() -> nn.Module:
    """LayerNorm takes the torch.func route."""
    return init_(nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)), seed=3)


def conv_net() -> nn.Module:
    return init_(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)), seed=4)


class WithUnused(nn.Module):
    """A Linear layer that the forward pass never calls (zero Fisher)."""

    def __init__(self):
        super().__init__()
        self.body = mlp("sigmoid", widths=(3, 4, 3))
        self.unused = nn.Linear(2, 2).double()

    def forward(self, x):
        return self.body(x)


CASES = {
    "sigmoid_mlp": (lambda: mlp("sigmoid", widths=(3, 5, 4, 3)), (7, 3)),
    "layernorm": (layernorm_net, (6, 3)),
    "conv": (conv_net, (5, 2, 5, 5)),
    "unused_layer": (WithUnused, (6, 3)),
}


def test_flops_choices_unchanged():
    """The flops model's plan and reported costs on a small sigmoid MLP.  The costs come from the documented formula,
    written out here from the layer sizes (not pinned): an exact layer costs ``C`` seeds whose backward crosses it
    and every later layer, plus ``C`` reductions of its own size; the output layer needs no seeds, only its own
    reduction.  The plan (exact everywhere) is pinned: a change to it must be deliberate."""
    net = sigmoid_mlp()
    ch = select(net, sigmoid_inputs(), likelihood="categorical", cost_model="flops")
    sizes = [net[i].weight.numel() + net[i].bias.numel() for i in (0, 2, 4)]  # 112, 272, 68
    n_out = net[4].out_features
    exact_cost = [n_out * sum(sizes[i:]) + n_out * sizes[i] for i in range(2)] + [sizes[2]]
    expected = {f"{k}.{p}": ("exact", 1, float(cost)) for k, cost in zip((0, 2, 4), exact_cost)
                for p in ("weight", "bias")}  # fmt: skip
    assert {n: (c.estimator, c.n_samples, c.cost) for n, c in ch.items()} == expected


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("case", list(CASES))
def test_selection_fisher_is_the_exact_fisher(case, likelihood):
    make, shape = CASES[case]
    net, x = make(), inputs(shape)
    sel = run_selection(net, x, likelihood=likelihood, cost_model="flops")
    ref = diagonal_fisher(net, x, likelihood=likelihood, estimator="exact")
    assert sel.fisher.keys() == ref.keys() == sel.choices.keys()
    for n in ref:
        assert sel.fisher[n].dtype == ref[n].dtype and not sel.fisher[n].requires_grad
        torch.testing.assert_close(sel.fisher[n], ref[n], rtol=1e-12, atol=1e-15, msg=lambda m, n=n: f"{n}: {m}")
    if case == "unused_layer":
        assert sel.choices["unused.weight"].reason.startswith("unused") and not sel.fisher["unused.weight"].any()


def test_selection_of_unused_parameters_only():
    """Every selected parameter unused by the forward pass: no layer to plan, zero Fisher, exact."""
    net = WithUnused()
    sel = run_selection(net, inputs((6, 3)), likelihood="categorical", cost_model="flops",
                        names=["unused.weight", "unused.bias"])  # fmt: skip
    assert plan_of(sel.choices) == {"unused.weight": ("exact", 1), "unused.bias": ("exact", 1)}
    assert not sel.fisher["unused.weight"].any() and sel.summary.startswith("plan: 0 of 0 layers exact")


def test_selection_respects_names():
    net, x = mlp("sigmoid", widths=(3, 5, 4, 3)), inputs((7, 3))
    names = ["2.weight", "4.bias"]
    sel = run_selection(net, x, likelihood="categorical", cost_model="flops", names=names)
    ref = diagonal_fisher(net, x, likelihood="categorical", estimator="exact")
    assert sorted(sel.fisher) == sorted(sel.choices) == sorted(names) and sel.costs.names == tuple(sorted(names))
    for n in names:
        torch.testing.assert_close(sel.fisher[n], ref[n], rtol=1e-12, atol=1e-15)


def test_select_draws_no_labels():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    run_selection(sigmoid_mlp(), sigmoid_inputs(8), likelihood="categorical", generator=g, cost_model="measured")
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("cost_model", ["measured", "flops"])
def test_costs_passed_back_are_reused(monkeypatch, cost_model):
    calls = []
    real = sel_mod.build_costs
    monkeypatch.setattr(sel_mod, "build_costs", lambda *a, **k: calls.append(1) or real(*a, **k))
    net, x = sigmoid_mlp(), sigmoid_inputs(16)
    first = run_selection(net, x, likelihood="categorical", cost_model=cost_model)
    assert isinstance(first.costs, Costs) and len(calls) == 1
    assert first.costs.input_shape == (16, 6) and first.costs.cost_model == cost_model
    assert set(first.costs.per_param) == {n for n, _ in net.named_parameters()}
    x2 = sigmoid_inputs(32)[16:]  # another batch, same shape: the costs still hold
    again = run_selection(net, x2, likelihood="categorical", cost_model=cost_model, costs=first.costs)
    assert len(calls) == 1 and again.costs is first.costs
    assert plan_of(select(net, x2, likelihood="categorical", cost_model=cost_model, costs=first.costs)) == plan_of(
        again.choices
    )
    if cost_model == "flops":
        assert plan_of(again.choices) == plan_of(select(net, x2, likelihood="categorical", cost_model="flops"))


@pytest.mark.parametrize(
    "over, msg",
    [
        (dict(inputs=sigmoid_inputs(8)), r"inputs \(16, 6\).*not 'flops', \(8, 6\)"),
        (dict(inputs=sigmoid_inputs(16).float()), r"torch.float64.*torch.float32"),
        (dict(names=["0.weight"]), r"6 parameters, not .* 1 parameters"),
        (dict(cost_model="measured"), r"'flops' costs.*not 'measured'"),
    ],
)
def test_mismatched_costs_raise(over, msg):
    net = sigmoid_mlp()
    costs = run_selection(net, sigmoid_inputs(16), likelihood="categorical", cost_model="flops").costs
    kw = {**dict(inputs=sigmoid_inputs(16), likelihood="categorical", cost_model="flops", costs=costs), **over}
    if kw["inputs"].dtype == torch.float32:
        net = net.float()
    with pytest.raises(ValueError, match=msg):
        select(net, **kw)


def test_measured_costs_time_whole_model_passes(monkeypatch):
    """A fixed number of whole-model passes whatever the depth; the one- and four-sample timings separate the cost
    per sample from the per-call overhead; each total is split in the flops model's proportions."""
    lik = get_likelihood("categorical")
    for widths in [(3, 4, 3), (3, 5, 5, 5, 5, 3)]:
        timings = iter([3.0, 1.0, 1.6])  # t_exact = 3 s, t_one = 1 s, t_four = 1.6 s: 0.2 s/sample, 0.8 s overhead

        def fake_time(fn, repeats=1, timings=timings):
            fn()
            return next(timings)

        monkeypatch.setattr(cost_mod, "_time", fake_time)
        net, x = mlp("sigmoid", widths=widths), inputs((6, 3))
        with Probe(net, x, lik) as probe:
            seeded, real = [], probe.seeded
            probe.seeded = lambda seeds, names=None, diagonal=None, real=real, seeded=seeded: (
                seeded.append(seeds.shape[0]) or real(seeds, names, diagonal=diagonal)
            )
            units = sel_mod.module_units(probe)
            costs, overhead, (k_ex, k_1) = cost_mod.measured_costs(probe, units, warm_exact=True)
            flops = cost_mod.flops_costs(probe, units)
            uf = cost_mod.unit_flops(probe, units)
        # warm-ups (one and four samples), then the timed exact (3 seeds), one-sample and four-sample passes
        assert seeded == [1, 4, 3, 1, 4]
        assert overhead == pytest.approx(0.8)
        assert sum(c for c, _ in costs.values()) == pytest.approx(3.0 - 0.8)
        assert sum(c for _, c in costs.values()) == pytest.approx(0.2)
        tot_ex = sum(c for c, _ in flops.values())
        tot_1 = sum(c for _, c in flops.values())
        for n, (c_ex, c_1) in costs.items():
            assert c_ex == pytest.approx(2.2 * flops[n][0] / tot_ex) and c_1 == pytest.approx(0.2 * flops[n][1] / tot_1)
        # the mixed-plan model, scaled by these timings, prices the uniform plans at what was measured
        c = sel_mod.Costs("measured", (6, 3), x.dtype, tuple(sorted(costs)), costs, 0.5, tuple(map(tuple, units)),
                          tuple((k_ex * a, k_ex * b, k_1 * c, k_1 * d) for a, b, c, d in uf))
        names = [n for u in units for n in u]
        assert c.refresh_cost({n: ("exact", 1) for n in names}) == pytest.approx(0.5 + 2.2)
        assert c.refresh_cost({n: ("mc1", 1) for n in names}) == pytest.approx(0.5 + 0.2)
        assert c.refresh_cost({n: ("mc1", 4) for n in names}) == pytest.approx(0.5 + 0.8)


def test_wide_output_exact_on_the_output_layer_and_several_samples_below():
    """64 Bernoulli outputs: exact costs 64 seeds below the output layer but nothing on it (no seeds), and a refresh
    pays the forward pass whatever the plan, so Î₁ samples below are cheap next to it: the flops model takes exact on
    the output layer and Î₁ with more than one sample on the hidden layers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 64)).double()
    x = (torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.7).double()
    ch = select(net, x, likelihood="bernoulli", cost_model="flops")
    assert (ch["4.weight"].estimator, ch["4.bias"].estimator) == ("exact", "exact")
    sel = run_selection(net, x, likelihood="bernoulli", cost_model="flops")
    assert sel.summary.startswith("plan: 1 of 3 layers exact, 2 ")
    assert "exact everywhere: refresh" in sel.summary
    assert sel.plan_cost < sel.exact_cost
    for n in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert ch[n].estimator in ("mc1", "hutchinson") and ch[n].n_samples > 1, (n, ch[n])


def plan_error_cost(stats, costs, options):
    """Scalar reference of the selection's score: (sum_t sqrt(a_t + l_t/N_t), Costs.unit_refresh_cost)."""
    err = sum(math.sqrt(a + (l / o if o else 0.0)) for st, o in zip(stats, options) if st is not None
              for a, l in zip(st.a, st.l))  # fmt: skip
    return err, costs.unit_refresh_cost(options)


def _stats(a, l, n_need=1):
    return sel_mod.UnitStats(("w",), [a], [l], n_need, 1.0, 0.0, 0.0, a, l)


@pytest.mark.parametrize("seed", range(40))
def test_joint_plan_is_the_brute_force_optimum(seed):
    """The search finds (to 1 %: it is a local search; 0.3 % at worst over 300 seeds when written) the plan that
    minimises cost x (sum_t sqrt(a_t + l_t/N_t))^2 over every combination of options (exact or Î₁ with
    N_need..max samples per layer), on random small problems where layers are
    coupled through the deepest backward of each group."""
    import itertools
    import random

    rnd = random.Random(seed)
    n_units, max_n = 3, 5
    noise = [0.0, 0.1, 1, 10, 100]
    stats = [_stats(rnd.uniform(0.01, 1), rnd.choice(noise), rnd.randint(1, 3)) for _ in range(n_units)]
    sizes = [rnd.uniform(1, 10) for _ in range(n_units)]
    c = rnd.choice([2, 10, 100])
    uc = tuple((c * sum(sizes[i:]), c * sizes[i], sum(sizes[i:]), sizes[i]) for i in range(n_units))
    costs = sel_mod.Costs("flops", (1,), torch.float64, ("w",), {}, rnd.uniform(0, 50), (("w",),) * n_units, uc)
    opts, j = sel_mod.joint_plan(stats, costs, max_n)
    best = math.inf
    for combo in itertools.product(*[[0, *range(st.n_need, max_n + 1)] for st in stats]):
        e, cost = plan_error_cost(stats, costs, list(combo))
        best = min(best, cost * e * e)
    assert best <= j <= best * 1.01
    e, cost = plan_error_cost(stats, costs, opts)
    assert cost * e * e == pytest.approx(j, rel=1e-12)
    assert all(o == 0 or o >= st.n_need for o, st in zip(opts, stats))


def test_joint_plan_prices_the_shared_backward():
    """One exact layer deep down costs nearly a whole exact pass (its seeds cross every layer above it): with the
    input noise of every layer equal, the deep layer goes Î₁ together with the others rather than alone.  Per layer
    in isolation (the old rule) the deep layer's exact share looks cheap."""
    c = 100
    sizes = [1.0, 1.0, 1.0]
    uc = tuple((c * sum(sizes[i:]), c * sizes[i], sum(sizes[i:]), sizes[i]) for i in range(3))
    costs = sel_mod.Costs("flops", (1,), torch.float64, ("w",), {}, 1.0, (("w",),) * 3, uc)
    stats = [_stats(1.0, 1.0), _stats(1.0, 1.0), _stats(1.0, 1.0)]
    opts, _ = sel_mod.joint_plan(stats, costs, 16)
    assert all(o > 0 for o in opts)
    # a layer with huge label noise relative to its input noise stays exact; exact's seeds then go that deep only
    stats[2] = _stats(1.0, 1e6)
    opts, _ = sel_mod.joint_plan(stats, costs, 16)
    assert opts[2] == 0 and opts[0] > 0 and opts[1] > 0


def test_current_plan_is_kept_within_the_tie_margin():
    """Hysteresis: the plan in use is kept unless the new optimum beats it by the tie margin; ``changed`` says so."""
    net, x = sigmoid_mlp(), sigmoid_inputs()
    first = run_selection(net, x, likelihood="categorical", cost_model="flops")
    plan = plan_of(first.choices)
    again = run_selection(net, x, likelihood="categorical", cost_model="flops", current=plan)
    assert not again.changed and plan_of(again.choices) == plan
    bad = {n: ("mc1", 16) for n in plan}  # far from the optimum: replaced
    third = run_selection(net, x, likelihood="categorical", cost_model="flops", current=bad)
    assert third.changed and plan_of(third.choices) == plan
    assert third.plan_cost == pytest.approx(first.costs.refresh_cost(plan))
    assert third.exact_cost == pytest.approx(first.costs.refresh_cost({n: ("exact", 1) for n in plan}))
    # the summary compares the plan (exact everywhere here) with the best all-Î₁ plan, in flops units
    assert third.summary.startswith("plan: 3 of 3 layers exact, predicted refresh ")
    assert "(flops units)" in third.summary and "on every layer with seeds" in third.summary


def test_unit_stats_match_direct_sums():
    """Per tensor a_t = sum_i Var_x F_i / sum_i F_i^2 and l_t = sum_i E_x v1_i / sum_i F_i^2 (batch means), from
    the fused sums, against a direct float64 computation from the moments."""
    from fisher_optim.variance import moments_from_probe

    net, x = sigmoid_mlp(), sigmoid_inputs(16)
    m = x.shape[0]
    with Probe(net, x, get_likelihood("categorical")) as probe:
        mom = moments_from_probe(probe, with_v2=True, with_fisher_sq=True)
        units = [tuple(u) for u in sel_mod.module_units(probe)]
    sums = sel_mod.tensor_sums(mom, [n for u in units for n in u])
    for unit in units:
        numel = sum(mom.fisher[n].numel() for n in unit)
        st = sel_mod.unit_stats(unit, sums, numel, m, 0.5, 0.1, True)
        for n, a, l in zip(unit, st.a, st.l):
            f = mom.fisher[n].double() / m
            var = mom.fisher_sq[n].double() / m - f**2
            assert a == pytest.approx(float(var.sum() / (f**2).sum()), rel=1e-9)
            assert l == pytest.approx(float((mom.v1[n].double() / m).sum() / (f**2).sum()), rel=1e-9)
        f_mean = sum(float(mom.fisher[n].double().sum()) for n in unit) / numel / m
        v1 = sum(float(mom.v1[n].double().sum()) for n in unit) / numel / m**2
        assert st.f == pytest.approx(f_mean, rel=1e-9) and st.v1 == pytest.approx(v1, rel=1e-9)
        assert st.n_need == max(1, math.ceil(0.5 * v1 / (0.1 * f_mean) ** 2))


def test_kept_plan_is_said_in_the_summary():
    """A plan in use near the optimum (every Î₁ layer one sample more) is kept, and the summary says by how much the
    new optimum would have won."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 64)).double()
    x = (torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.7).double()
    best = plan_of(run_selection(net, x, likelihood="bernoulli", cost_model="flops").choices)
    near = {n: (e, k + 1 if e == "mc1" else k) for n, (e, k) in best.items()}
    assert near != best
    sel = run_selection(net, x, likelihood="bernoulli", cost_model="flops", current=near)
    assert not sel.changed and plan_of(sel.choices) == near
    assert sel.summary.startswith("kept the plan in use (the new optimum's predicted error at equal time is 0.")
