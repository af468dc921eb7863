"""EWC (fisher_optim.ewc) against brute-force float64 references.

Every Fisher is checked against the formulas of ``tests/reference.py`` on ``J = dh/dtheta`` and
``U = diag d^2 h/dtheta^2`` from ``torch.func``; the penalty and its gradient against the formula written on
flattened vectors.  Sampled labels are reproduced with an identically seeded generator.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import DTYPE, MAX_BATCH, draw_labels, gen, init_, inputs, mlp, model_and_inputs, reference_case
from reference import empirical_diag, exact_diag, mc1_diag, mc2_diag, split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fisher_optim import selection
from fisher_optim.ewc import EWC, EWC_ESTIMATORS
from fisher_optim.likelihoods import Categorical

LAM = 3.5


MODEL = "mlp-tanh"  # conftest's 3-4-5-3 tanh MLP in float64; its brute-force derivatives are cached


def setup(m: int = MAX_BATCH):
    """A fresh float64 model, ``m`` inputs and observed class labels."""
    model, x = model_and_inputs(MODEL, m)
    y = torch.randint(0, 3, (m,), generator=gen(5))
    return model, x, y


def reference(rows=slice(None)):
    """``(lik, names, h, J, U)`` of the unperturbed model for the selected input rows (cached brute force)."""
    _, _, names, h, J, U = reference_case(MODEL)
    return Categorical(), names, h[rows], J[rows], U[rows]


def flat(d: dict, names) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def params_flat(model, names):
    p = dict(model.named_parameters())
    return torch.cat([p[n].detach().reshape(-1) for n in names])


def perturb(model, seed: int, scale: float = 0.3):
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def batched_reference(lik, h, J, y, batch):
    """sum_b (B_b/M) (mean_{m in b} score_m)^2 with observed labels (the popular-library variant)."""
    scores = torch.einsum("ma,map->mp", lik.grad(h, y), J)  # d(-log p(y_m|x_m))/dtheta, (M, P)
    m = h.shape[0]
    out = torch.zeros(J.shape[-1], dtype=J.dtype)
    for s in range(0, m, batch):
        b = scores[s : s + batch]
        out += b.shape[0] / m * b.mean(0).square()
    return out


# -- the Fisher each estimator stores ---------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:EWC.*negative:UserWarning")  # Î₂ may be negative: tested elsewhere
@pytest.mark.parametrize("estimator", ["exact", "mc1", "mc2", "empirical", "batched_empirical"])
def test_consolidate_fisher_matches_brute_force(estimator):
    model, x, y = setup()
    lik, names, h, J, U = reference()
    ewc = EWC(model, likelihood="categorical", lam=LAM, estimator=estimator, n_samples=2, generator=gen(11))
    F = ewc.consolidate(x, y, batch_size=3 if estimator == "batched_empirical" else None)
    labels = draw_labels(model, x, lik, 2, seed=11)
    expected = {
        "exact": lambda: exact_diag(lik, h, J),
        "mc1": lambda: mc1_diag(lik, h, J, labels),
        "mc2": lambda: mc2_diag(lik, h, J, U, labels),
        "empirical": lambda: empirical_diag(lik, h, J, y),
        "batched_empirical": lambda: batched_reference(lik, h, J, y, 3),
    }[estimator]()
    assert list(F) == names
    torch.testing.assert_close(flat(F, names), expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(flat(ewc.tasks[0]["fisher"], names), expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(flat(ewc.tasks[0]["anchor"], names), params_flat(model, names), rtol=0, atol=0)


def test_negative_fisher_entries_warn():
    """Î₂ with one label has negative entries on this tanh model: consolidate says so; exact never warns."""
    model, x, _ = setup()
    with pytest.warns(UserWarning, match="Fisher entries from estimator 'mc2' are negative"):
        F = EWC(model, likelihood="categorical", lam=1.0, estimator="mc2", generator=gen(11)).consolidate(x)
    assert any(bool((v < 0).any()) for v in F.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EWC(model, likelihood="categorical", lam=1.0, estimator="exact").consolidate(x)


def test_batched_variant_is_not_the_empirical_fisher():
    """The trap: with batches of one it is the empirical Fisher; with larger batches far smaller."""
    model, x, y = setup()
    emp = EWC(model, likelihood="categorical", lam=1.0, estimator="empirical").consolidate(x, y)
    batched = EWC(model, likelihood="categorical", lam=1.0, estimator="batched_empirical")
    one = batched.consolidate(x, y, batch_size=1)
    four = batched.consolidate(x, y, batch_size=4)  # one batch of all 4
    for n in emp:
        torch.testing.assert_close(one[n], emp[n], rtol=1e-12, atol=1e-15)
    total = sum(float(v.sum()) for v in emp.values())
    assert sum(float(v.sum()) for v in four.values()) < 0.6 * total


def test_auto_uses_the_selection_plan():
    model, x, _ = setup()
    lik, names, h, J, _ = reference()
    plan = {n: ("exact", 1) for n in names}
    plan["0.weight"] = ("mc1", 3)
    ewc = EWC(model, likelihood="categorical", lam=1.0, estimator="auto", generator=gen(11),
              select_kwargs={"target_rse": 0.5})
    assert ewc.select_kwargs["ema_decay"] == 0.0 and ewc.select_kwargs["target_rse"] == 0.5
    F = ewc.consolidate(x)
    assert set(ewc.last_plan) == set(names)
    # one batch: its estimate is the exact Fisher the selection computed anyway
    ex = split(model, names, exact_diag(lik, h, J))
    for n in names:
        torch.testing.assert_close(F[n], ex[n], rtol=1e-10, atol=1e-14)
    # two batches: the first is the selection's exact Fisher, the second uses the plan (no labels drawn before it)
    ewc = EWC(model, likelihood="categorical", lam=1.0, estimator="auto", generator=gen(11),
              select_kwargs={"target_rse": 0.5, "cost_model": "flops"})
    half = x.shape[0] // 2
    F2 = ewc.consolidate(x, batch_size=half)
    plan = {n: (c.estimator, c.n_samples) for n, c in ewc.last_plan.items()}
    first = selection.estimate_plan(model, x[:half], likelihood="categorical", plan={n: ("exact", 1) for n in names})
    second = selection.estimate_plan(model, x[half:], likelihood="categorical", plan=plan, generator=gen(11))
    m2 = x.shape[0] - half
    for n in names:
        expected = (half * first[n] + m2 * second[n]) / x.shape[0]
        torch.testing.assert_close(F2[n], expected, rtol=1e-10, atol=1e-14)


# -- DataLoader input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["exact", "empirical", "batched_empirical"])
def test_dataloader_mean_equals_full_batch_mean(estimator):
    """Batches of 3 and 1: the DataLoader Fisher is the mean over all 4 examples, not over batches."""
    model, x, y = setup()
    ref = EWC(model, likelihood="categorical", lam=1.0, estimator=estimator)
    full = ref.consolidate(x, y, batch_size=3 if estimator == "batched_empirical" else None)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False)
    F = EWC(model, likelihood="categorical", lam=1.0, estimator=estimator, progress=True).consolidate(loader)
    for n in full:
        torch.testing.assert_close(F[n], full[n], rtol=1e-12, atol=1e-15)
    if estimator == "exact":  # bare-x batches from a generator (no len), and chunked tensors
        G = EWC(model, likelihood="categorical", lam=1.0).consolidate(x[s : s + 2] for s in range(0, 4, 2))
        H = EWC(model, likelihood="categorical", lam=1.0).consolidate(x, batch_size=2)
        for n in full:
            torch.testing.assert_close(G[n], full[n], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(H[n], full[n], rtol=1e-12, atol=1e-15)
        # the unweighted mean over batches (the wrong scaling) differs: the last batch has 1 example
        ewc = EWC(model, likelihood="categorical", lam=1.0)
        per_batch = [ewc.consolidate(b) for b in (x[:3], x[3:])]
        wrong = {n: sum(p[n] for p in per_batch) / 2 for n in full}
        assert not all(torch.allclose(wrong[n], full[n]) for n in full)


def test_mc1_dataloader_draws_labels_per_batch():
    """mc1 over a DataLoader = (1/M) sum over batches of the batch-sum Î₁ with that batch's draw."""
    model, x, _ = setup()
    ewc = EWC(model, likelihood="categorical", lam=1.0, estimator="mc1", generator=gen(3))
    F = ewc.consolidate(DataLoader(TensorDataset(x), batch_size=3))
    g = gen(3)
    total = 0
    for rows in (slice(0, 3), slice(3, 4)):
        lik, names, h, J, _ = reference(rows)
        yb = lik.sample(h.detach(), 1, generator=g)
        total = total + mc1_diag(lik, h, J, yb) * h.shape[0]
    torch.testing.assert_close(flat(F, names), total / 4, rtol=1e-10, atol=1e-14)


# -- penalty ---------------------------------------------------------------------------------------------
def brute_penalty_and_grad(model, names, tasks, lam):
    theta = params_flat(model, names)
    val = 0.0
    grad = torch.zeros_like(theta)
    for F, a in tasks:
        val = val + 0.5 * lam * (F * (theta - a) ** 2).sum()
        grad = grad + lam * F * (theta - a)
    return val, grad


def test_penalty_value_and_gradient_separate_mode():
    model, x, y = setup()
    ewc = EWC(model, likelihood="categorical", lam=LAM)
    names = [n for n, _ in model.named_parameters()]
    tasks = []
    for t in range(3):
        F = ewc.consolidate(x[t:])
        tasks.append((flat(F, names), params_flat(model, names)))
        perturb(model, seed=20 + t)
    assert ewc.n_tasks == 3 and len(ewc.tasks) == 3
    for t, (F, a) in enumerate(tasks):  # anchors and Fisher per task, kept apart
        torch.testing.assert_close(flat(ewc.tasks[t]["fisher"], names), F, rtol=0, atol=0)
        torch.testing.assert_close(flat(ewc.tasks[t]["anchor"], names), a, rtol=0, atol=0)
    assert not torch.equal(tasks[0][1], tasks[1][1])
    pen = ewc.penalty()
    val, grad = brute_penalty_and_grad(model, names, tasks, LAM)
    torch.testing.assert_close(pen, val, rtol=1e-12, atol=0)
    g = torch.autograd.grad(pen, list(model.parameters()))
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in g]), grad, rtol=1e-12, atol=1e-15)
    assert all(p.grad is None for p in model.parameters())
    ewc.lam = 2 * LAM
    torch.testing.assert_close(ewc.penalty(), 2 * val, rtol=1e-12, atol=0)


@pytest.mark.parametrize("decay", [1.0, 0.6])
def test_online_mode_decays_fisher_and_moves_anchor(decay):
    model, x, y = setup()
    names = [n for n, _ in model.named_parameters()]
    ewc = EWC(model, likelihood="categorical", lam=LAM, mode="online", decay=decay)
    F1 = flat(ewc.consolidate(x), names)
    perturb(model, seed=30)
    F2 = flat(ewc.consolidate(x[:3]), names)
    anchor2 = params_flat(model, names)
    perturb(model, seed=31)
    F3 = flat(ewc.consolidate(x[1:]), names)
    anchor3 = params_flat(model, names)
    assert ewc.n_tasks == 3 and len(ewc.tasks) == 1
    running = decay * (decay * F1 + F2) + F3
    torch.testing.assert_close(flat(ewc.tasks[0]["fisher"], names), running, rtol=1e-12, atol=0)
    torch.testing.assert_close(flat(ewc.tasks[0]["anchor"], names), anchor3, rtol=0, atol=0)
    assert not torch.equal(anchor2, anchor3)
    perturb(model, seed=32)
    val, grad = brute_penalty_and_grad(model, names, [(running, anchor3)], LAM)
    pen = ewc.penalty()
    torch.testing.assert_close(pen, val, rtol=1e-12, atol=0)
    g = torch.autograd.grad(pen, list(model.parameters()))
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in g]), grad, rtol=1e-12, atol=1e-15)


def test_penalty_before_consolidate_is_a_zero_tensor():
    model, _, _ = setup()
    pen = EWC(model, likelihood="categorical", lam=LAM).penalty()
    assert isinstance(pen, torch.Tensor) and pen.dim() == 0 and pen.dtype == DTYPE and float(pen) == 0.0


def test_anchors_are_copies():
    model, x, _ = setup()
    ewc = EWC(model, likelihood="categorical", lam=LAM)
    ewc.consolidate(x)
    before = {n: v.clone() for n, v in ewc.tasks[0]["anchor"].items()}
    perturb(model, seed=40)
    for n, v in ewc.tasks[0]["anchor"].items():
        assert torch.equal(v, before[n])
    assert float(ewc.penalty().detach()) > 0


def test_adam_pulls_parameters_back_to_the_anchor():
    """Any optimizer works: Adam on the penalty alone shrinks it by orders of magnitude."""
    model, x, _ = setup()
    ewc = EWC(model, likelihood="categorical", lam=100.0)
    ewc.consolidate(x)
    perturb(model, seed=50)
    start = float(ewc.penalty().detach())
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        ewc.penalty().backward()
        opt.step()
    assert float(ewc.penalty().detach()) < 1e-2 * start


# -- checkpointing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip(mode):
    model, x, y = setup()
    kw = {"likelihood": "categorical", "estimator": "mc1", "mode": mode}
    if mode == "online":
        kw["decay"] = 0.8
    ewc = EWC(model, lam=LAM, generator=gen(1), **kw)
    ewc.consolidate(x)
    perturb(model, seed=60)
    ewc.consolidate(x[:3])
    buf = io.BytesIO()
    torch.save(ewc.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    other = EWC(model, lam=1.0, generator=gen(999), **{**kw, "mode": "separate", "decay": 1.0})
    other.load_state_dict(state)
    assert (other.lam, other.mode, other.decay, other.n_tasks) == (LAM, mode, ewc.decay, 2)
    assert len(other.tasks) == len(ewc.tasks)
    for a, b in zip(ewc.tasks, other.tasks):
        for key in ("fisher", "anchor"):
            assert a[key].keys() == b[key].keys()
            for n in a[key]:
                assert torch.equal(a[key][n], b[key][n])
    perturb(model, seed=61)
    torch.testing.assert_close(other.penalty(), ewc.penalty(), rtol=0, atol=0)
    # the label generator resumes where it stopped: the next consolidation draws the same labels
    Fa, Fb = ewc.consolidate(x), other.consolidate(x)
    for n in Fa:
        assert torch.equal(Fa[n], Fb[n])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: s.pop("tasks"), "missing keys"),
        (lambda s: s.update(lam=-1.0), "Invalid lam: -1.0"),
        (lambda s: s["tasks"][0]["fisher"].update({"nope": torch.zeros(1)}), "fisher' and 'anchor"),
        (lambda s: s["tasks"][0]["fisher"].update({"0.bias": torch.zeros(2)}), "has shape"),
        (lambda s: s.update(mode="online"), "online mode holds one running task"),
    ],
)
def test_load_state_dict_rejects_bad_states(mutate, match):
    model, x, _ = setup()
    ewc = EWC(model, likelihood="categorical", lam=LAM)
    ewc.consolidate(x)
    ewc.consolidate(x[:3])
    state = ewc.state_dict()
    state["tasks"] = [{k: dict(v) for k, v in t.items()} for t in state["tasks"]]
    mutate(state)
    fresh = EWC(model, likelihood="categorical", lam=LAM)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.n_tasks == 0 and fresh.lam == LAM  # unchanged


# -- bad inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": -1.0}, r"Invalid lam: -1.0"),
        ({"lam": float("nan")}, r"Invalid lam: nan"),
        ({"lam": True}, r"Invalid lam: True"),
        ({"lam": "1"}, r"Invalid lam: 1"),
        ({"mode": "joint"}, r"Invalid mode: 'joint'"),
        ({"mode": "online", "decay": 0.0}, r"Invalid decay: 0.0"),
        ({"mode": "online", "decay": 1.5}, r"Invalid decay: 1.5"),
        ({"mode": "online", "decay": -0.5}, r"Invalid decay: -0.5"),
        ({"decay": 0.5}, r"Invalid decay: 0.5. decay is only used with mode='online'"),
        ({"estimator": "kfac"}, r"Invalid estimator: 'kfac'"),
        ({"n_samples": 0}, r"Invalid n_samples: 0"),
        ({"likelihood": "laplace"}, r"Invalid likelihood: 'laplace'"),
        ({"generator": 3}, r"Invalid generator: 3"),
        ({"progress": "yes"}, r"Invalid progress: 'yes'"),
        ({"select_kwargs": {"target_rse": 0.2}}, r"Invalid select_kwargs"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    model, _, _ = setup()
    args = {"likelihood": "categorical", "lam": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        EWC(model, **args)


def test_lam_setter_validates():
    model, _, _ = setup()
    ewc = EWC(model, likelihood="categorical", lam=1.0)
    with pytest.raises(ValueError, match="Invalid lam: -2"):
        ewc.lam = -2
    assert ewc.lam == 1.0


@pytest.mark.parametrize(
    "estimator, call, match",
    [
        ("exact", lambda x, y: (x[:0],), r"Invalid inputs"),
        ("exact", lambda x, y: (x, y[:3]), r"Invalid targets"),
        ("exact", lambda x, y: (x,), None),
        ("exact", lambda x, y: (x, None, 0), r"Invalid batch_size: 0"),
        ("exact", lambda x, y: (DataLoader(TensorDataset(x, y), batch_size=2), y), r"Invalid targets"),
        ("exact", lambda x, y: (DataLoader(TensorDataset(x, y), batch_size=2), None, 2), "Invalid batch_size"),
        ("exact", lambda x, y: ([],), r"Invalid inputs: no examples"),
        ("empirical", lambda x, y: (x,), r"needs targets"),
        ("batched_empirical", lambda x, y: (DataLoader(TensorDataset(x), batch_size=2),), r"needs targets"),
        ("empirical", lambda x, y: (x, y.double()), r"integer class indices"),
    ],
)
def test_consolidate_rejects_bad_inputs(estimator, call, match):
    model, x, y = setup()
    ewc = EWC(model, likelihood="categorical", lam=1.0, estimator=estimator)
    args = call(x, y)
    if match is None:  # the control row: a valid call works
        ewc.consolidate(*args)
        assert ewc.n_tasks == 1
        return
    kwargs = {"batch_size": args[2]} if len(args) == 3 else {}
    with pytest.raises(ValueError, match=match):
        ewc.consolidate(*args[:2], **kwargs)
    assert ewc.n_tasks == 0 and ewc.tasks == []


# -- side effects ----------------------------------------------------------------------------------------
def bn_model():
    return init_(
        nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)), seed=3
    )


@pytest.mark.filterwarnings("ignore:EWC.*negative:UserWarning")  # Î₂ may be negative: tested elsewhere
@pytest.mark.parametrize("estimator", EWC_ESTIMATORS)
def test_consolidate_leaves_mode_batchnorm_and_grad_untouched(estimator):
    model = bn_model() if estimator != "mc2" else mlp("tanh")  # Î₂ needs Linear/Conv-only models
    if estimator == "mc2":
        model = nn.Sequential(model[0], model[1], nn.Dropout(0.5), *list(model)[2:])
    x, y = inputs((6, 3), seed=2), torch.randint(0, 3, (6,), generator=gen(4))
    model.train()
    model[1].train(False) if estimator == "mc2" else model[3].train(False)  # a mixed-mode model
    with torch.no_grad():  # one train-mode forward so the BN buffers are not at their defaults
        model(x)
    model[-1].weight.grad = torch.full_like(model[-1].weight, 7.0)
    flags = [m.training for m in model.modules()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    ewc = EWC(model, likelihood="categorical", lam=1.0, estimator=estimator, generator=gen(0))
    F = ewc.consolidate(DataLoader(TensorDataset(x, y), batch_size=4))  # batches of 4 and 2
    assert all(torch.isfinite(v).all() for v in F.values())
    assert [m.training for m in model.modules()] == flags
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    for n, p in model.named_parameters():
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n]), n


def test_eval_mode_fisher_with_dropout_is_deterministic():
    """Dropout is off during estimation: two exact consolidations agree, the model being in train mode."""
    model = bn_model().train()
    x = inputs((6, 3), seed=2)
    a = EWC(model, likelihood="categorical", lam=1.0).consolidate(x)
    b = EWC(model, likelihood="categorical", lam=1.0).consolidate(x)
    for n in a:
        assert torch.equal(a[n], b[n])


# -- the benchmark cannot rot ----------------------------------------------------------------------------
@pytest.mark.bench
def test_benchmark_smoke(tmp_path):
    pytest.importorskip("mlxtend")
    from benchmarks import ewc as bench

    results = bench.main(["--smoke", "--out", str(tmp_path)])
    assert set(results) == {"permuted", "split"}
    md = (tmp_path / "ewc.md").read_text()
    assert "python benchmarks/ewc.py --smoke --out" in md and "Machine: CPU" in md
    for e in bench.ESTIMATORS:
        assert md.count(f"| EWC {e} |") == 2
    assert md.count("| fine-tuning |") == 2
    assert (tmp_path / "ewc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for res in results.values():
        for runs in res["runs"].values():
            r = runs[0]["r_test"]
            assert r.shape == (2, 2) and ((r >= 0) & (r <= 1)).all()


@pytest.mark.bench
def test_benchmark_metrics():
    import numpy as np

    from benchmarks import ewc as bench

    r = np.array([[0.9, 0.1, 0.0], [0.7, 0.8, 0.1], [0.6, 0.5, 0.9]])
    assert bench.avg_acc(r) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert bench.forgetting(r) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
