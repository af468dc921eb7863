"""fisher_optim demo (``make demo``): FisherAdam(estimator="auto") beside AdamW on a char-level Transformer LM.

Where auto matters: a language model's exact Fisher needs positions x classes seeds per sequence (32 x 97 = 3,104
here), so auto has to choose, per layer, between exact and the sampled estimators (Î₁ with N labels, Hutchinson
with N probes, ...) from their predicted variance and measured cost.  This script shows what it chose and why.

Data and model (reused from ``benchmarks/lm_data.py``, nothing downloaded): the text of ``pydoc_data.topics``, a
97-character vocabulary, random 32-character training windows (batch 16), and the causal char Transformer of the
optimizer benchmark's ``lm_transformer`` problem (2 pre-norm layers, d = 32, 4 heads, 30 parameter tensors).
Both optimizers start from the same initial parameters and see the same batches.  The loss is the per-window NLL
(the *sum* over the window's 32 positions, mean over the batch): the scaling FisherAdam's Fisher assumes
(README, "Relation to the loss you train on"); the printed numbers are per character (divided by 32).  The only
change to the training loop is the optimizer's constructor, and the lr tuned for AdamW carries over unchanged
(FisherAdam divides by the Fisher of the training loss, F/B: Adam's units, docs/fisher-math.md §15)::

    opt = FisherAdam(model, likelihood="categorical", estimator="auto", lr=2e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

Each optimizer runs ``--steps`` steps or until ``--budget`` seconds of training have passed, whichever comes first
(auto's first refresh is exact and its first selection times the exact pass: on this LM those two steps cost far
more than the others).  After every step the script reads ``opt.fisher_report()`` (the optimizer's public report)
and records the estimator and sample count in use for each parameter tensor.

Prints: progress (training and validation NLL per character), per-layer choices of the last selection (estimator,
N, predicted relative standard error of the running estimate, predicted cost, the variance's source, the reason),
step times (ordinary steps, refresh steps, selection steps) and a few generated lines per model.  Writes
``benchmarks/results/demo_lm.png`` (loss against steps and seconds, the estimator per layer over the steps) and
``benchmarks/results/demo_lm.md`` (what it printed, with the command and the machine's load).

Time: about 5 ms per AdamW step and 6 ms per FisherAdam step without a refresh on one thread; on this output
(more than ``CLOSED_FORM_SEEDS`` positions x classes per window) FisherAdam's first refresh is Hutchinson N=1 and
its selections sample the variance (no exact pass), so a refresh takes tens of milliseconds and a selection about
a second at most.  Under 3 minutes in all on 2 cores, even shared (``--threads 1``: one torch thread is
the fastest when other processes share the cores; the budget is wall time and is checked between steps).

Usage::

    python examples/demo.py [--steps 3000] [--budget 75] [--seed 0] [--lr 2e-3] [--threads 1] [--out-dir ...]
    python examples/demo.py --smoke      # a tiny model, a few steps (the test suite's smoke run)
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout: make the package (and benchmarks/) importable
    sys.path.insert(0, str(ROOT))

from benchmarks.lm_data import VOCAB_SIZE, char_transformer, decode, encode, windows  # noqa: E402
from fisher_optim.optim import FisherAdam  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
FULL = dict(d_model=32, n_heads=4, n_layers=2, seq_len=32, batch=16, val_windows=128, eval_every=50)
SMOKE = dict(d_model=16, n_heads=2, n_layers=1, seq_len=8, batch=4, val_windows=16, eval_every=10)
PROMPT = "The "
BEFORE = "before the first selection"


def make_model(cfg: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return char_transformer(VOCAB_SIZE, d_model=cfg["d_model"], n_heads=cfg["n_heads"], n_layers=cfg["n_layers"],
                            max_len=cfg["seq_len"])  # fmt: skip


def window_nll(model, x, y) -> torch.Tensor:
    """Per-window NLL: sum over the positions, mean over the windows (fisher_optim's per-input scaling)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1), reduction="sum") / x.shape[0]


@torch.no_grad()
def validation_nll(model, val) -> float:
    """Validation NLL per character."""
    x, y = val
    return float(window_nll(model, x, y)) / x.shape[1]


def choices_of(report) -> dict[str, str]:
    """Per parameter, the estimator and sample count in use, as one label (from the public report)."""
    out = {}
    for name, r in report.items():
        est = r["estimator"]
        out[name] = BEFORE if est in ("-", "") else est if est == "exact" else f"{est} N={r['n_samples']}"
    return out


def train(name: str, make_opt, cfg: dict, args, val) -> dict:
    model = make_model(cfg, args.seed)
    opt = make_opt(model)
    auto = isinstance(opt, FisherAdam)
    batches = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every optimizer
    h = dict(step=[], seconds=[], train=[], step_s=[], val_step=[], val=[], val_seconds=[], refresh=[],
             selection=[], choices=[], stopped="")  # fmt: skip
    h["val_step"].append(0)
    h["val"].append(validation_nll(model, val))
    h["val_seconds"].append(0.0)
    refreshes = selections = 0
    elapsed = 0.0
    for step in range(1, args.steps + 1):
        x, y = windows("train", cfg["batch"], cfg["seq_len"], generator=batches)
        t0 = time.perf_counter()
        loss = window_nll(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t0
        elapsed += dt
        h["step"].append(step)
        h["seconds"].append(elapsed)
        h["train"].append(float(loss.detach()) / cfg["seq_len"])
        h["step_s"].append(dt)
        if auto:  # what the step used: the optimizer's public report (its counters and per-parameter choices)
            rep = opt.fisher_report()
            h["refresh"].append(rep.refreshes > refreshes)
            h["selection"].append(rep.selections > selections)
            if rep.refreshes > refreshes or not h["choices"]:
                h["choices"].append((step, choices_of(rep)))
            refreshes, selections = rep.refreshes, rep.selections
        last = step == args.steps or elapsed >= args.budget
        if step % cfg["eval_every"] == 0 or last or (auto and h["selection"][-1]):
            h["val_step"].append(step)
            h["val"].append(validation_nll(model, val))
            h["val_seconds"].append(elapsed)
            note = " (selection step)" if auto and h["selection"][-1] else ""
            print(f"  {name:10s} step {step:5d}: train {statistics.fmean(h['train'][-cfg['eval_every']:]):.3f}, "
                  f"validation {h['val'][-1]:.3f} nats/char, {elapsed:6.1f} s{note}", flush=True)  # fmt: skip
        if elapsed >= args.budget and step < args.steps:
            h["stopped"] = f"stopped by the {args.budget:g} s budget after {step} of {args.steps} steps"
            print(f"  {name:10s} {h['stopped']}", flush=True)
            break
    h["model"], h["opt"] = model, opt
    return h


@torch.no_grad()
def generate(model, cfg: dict, n_chars: int, seed: int, temperature: float = 0.7) -> str:
    """Temperature sampling from ``PROMPT`` (the last ``seq_len`` characters as context)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = encode(PROMPT).tolist()
    for _ in range(n_chars):
        ctx = torch.tensor([ids[-cfg["seq_len"] :]])
        probs = torch.softmax(model(ctx)[0, -1] / temperature, -1)
        ids.append(int(torch.multinomial(probs, 1, generator=g)))
    model.train()
    return decode(ids)


def step_times(h: dict) -> dict[str, str]:
    """Median step time of each kind, in ms (refresh/selection split only for FisherAdam)."""

    def fmt(ts):
        return f"{1000 * statistics.median(ts):.1f} ms (n={len(ts)})" if ts else "-"

    if not h["refresh"]:
        return {"step": fmt(h["step_s"])}
    kinds = {"step without refresh": [], "refresh step": [], "selection step": []}
    for i, dt in enumerate(h["step_s"]):
        kind = "selection step" if h["selection"][i] else "refresh step" if h["refresh"][i] else "step without refresh"
        kinds[kind].append(dt)
    out = {k: fmt(v) for k, v in kinds.items()}
    out["first step (first refresh)"] = f"{1000 * h['step_s'][0]:.1f} ms"
    out["selection steps (each)"] = ", ".join(f"{dt:.1f} s" for dt in kinds["selection step"]) or "-"
    return out


def layer_table(report) -> list[str]:
    """Markdown rows: the last selection's choice per parameter tensor, with the reason."""
    unit = report.cost_unit
    rows = [f"| parameter | estimator | N | predicted rse | cost [{unit}] | variance source | reason |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in report.items():
        source = r.get("source", "(not in the report)")
        rows.append(f"| {name} | {r['estimator']} | {r['n_samples']} | {r['rse']:.3g} | {r['cost']:.3g} | {source} "
                    f"| {r['reason']} |")  # fmt: skip
    return rows


#: one hue per estimator family, darker for more samples
FAMILY_CMAPS = {"exact": "Reds", "mc1": "Blues", "hutchinson": "Greens", "hutchinson_batch": "Purples",
                "mc2": "Oranges"}  # fmt: skip


def label_color(label: str, labels: list[str]):
    """Grey before the first selection; else the family's colour map, shaded by the label's rank in N."""
    import matplotlib

    if label == BEFORE:
        return "0.85"
    family = label.split(" ")[0]
    same = sorted((lab for lab in labels if lab.split(" ")[0] == family), key=lambda lab: int(lab.rsplit("=", 1)[-1])
                  if "=" in lab else 0)  # fmt: skip
    shade = 0.65 if len(same) == 1 else 0.4 + 0.5 * same.index(label) / (len(same) - 1)
    return matplotlib.colormaps[FAMILY_CMAPS.get(family, "Greys")](shade)


def plot(results: dict, cfg: dict, path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig = plt.figure(figsize=(15, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(1, 1.5))
    ax_step, ax_time, ax_img = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    k = max(1, min(50, len(next(iter(results.values()))["train"]) // 5))  # running mean of the mini-batch loss
    for (name, h), color in zip(results.items(), ("C0", "C1")):
        tl = torch.tensor(h["train"])
        smooth = F.avg_pool1d(tl[None, None], k, 1)[0, 0] if len(tl) >= k else tl
        steps, secs = h["step"][len(h["step"]) - len(smooth) :], h["seconds"][len(h["seconds"]) - len(smooth) :]
        ax_step.plot(steps, smooth, color=color, alpha=0.5, label=f"{name} training (mean of {k} batches)")
        ax_step.plot(h["val_step"], h["val"], color=color, marker="o", ms=3, label=f"{name} validation")
        ax_time.plot(secs, smooth, color=color, alpha=0.5, label=f"{name} training")
        ax_time.plot(h["val_seconds"], h["val"], color=color, marker="o", ms=3, label=f"{name} validation")
    ax_step.set(xlabel="step", ylabel="NLL per character (nats)", title="loss against steps (the same batches)")
    ax_time.set(xlabel="training seconds (steps only)", ylabel="NLL per character (nats)",
                title="loss against wall time")  # fmt: skip
    if max(h["seconds"][-1] for h in results.values()) > 10:  # seconds for AdamW, minutes for a slow start
        ax_time.set_xscale("symlog", linthresh=1.0)
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    h = next(h for h in results.values() if h["choices"])
    names = list(h["choices"][-1][1])
    found = {c for _, ch in h["choices"] for c in ch.values()} - {BEFORE}
    labels = [BEFORE] + sorted(found, key=lambda lab: (lab.split(" ")[0], int(lab.rsplit("=", 1)[-1]) if "=" in lab
                                                       else 0))  # fmt: skip
    code = {lab: i for i, lab in enumerate(labels)}
    n_steps = h["step"][-1]
    img = torch.zeros(len(names), n_steps)
    for (start, ch), nxt in zip(h["choices"], [s for s, _ in h["choices"][1:]] + [n_steps + 1]):
        for row, name in enumerate(names):
            img[row, start - 1 : nxt - 1] = code[ch.get(name, BEFORE)]
    cmap = matplotlib.colors.ListedColormap([label_color(lab, labels) for lab in labels])
    ax_img.imshow(img.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5,
                  extent=(0.5, n_steps + 0.5, len(names) - 0.5, -0.5))  # fmt: skip
    for i, sel in enumerate(h["selection"]):
        if sel:
            ax_img.axvline(i + 1, color="k", lw=0.8, ls="--")
    ax_img.set_yticks(range(len(names)), names, fontsize=5.5)
    ax_img.set(xlabel="step (dashed: a selection)",
               title="FisherAdam(auto): the plan per parameter tensor after each step (from opt.fisher_report())")
    ax_img.legend(handles=[Patch(color=cmap(i), label=lab) for i, lab in enumerate(labels)], fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    fig.suptitle(f"char Transformer LM (d={cfg['d_model']}, {cfg['n_layers']} layers), pydoc_data text, "
                 f"{cfg['seq_len']}-char windows, batch {cfg['batch']}: "
                 "FisherAdam(estimator='auto') vs AdamW")  # fmt: skip
    fig.text(0.01, 0.005, f"made by: {command}", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps per optimizer (at most)")
    parser.add_argument("--budget", type=float, default=75.0, help="training seconds per optimizer (at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--lr", "--adamw-lr", type=float, default=2e-3, help="the lr of both optimizers (2e-3)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where demo_lm.png/.md go ('' for none)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 25 steps (smoke test)")
    parser.add_argument("--verbose", action="store_true", help="log every estimator selection")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.steps < 1 or args.budget <= 0 or args.threads < 1:
        raise ValueError(f"Invalid steps/budget/threads: {args.steps}, {args.budget}, {args.threads}")
    if args.smoke:
        args.steps = min(args.steps, 25)
    cfg = SMOKE if args.smoke else FULL
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, cfg)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (the smoke test)


def _run(args, argv: list[str], cfg: dict) -> dict:
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    val = windows("validation", cfg["val_windows"], cfg["seq_len"], generator=torch.Generator().manual_seed(1234))
    print(f"char Transformer LM, pydoc_data.topics text: {args.steps} steps or {args.budget:g} s per optimizer, "
          f"batch {cfg['batch']} x {cfg['seq_len']} characters; seed {args.seed}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); load average {load0:.2f}")  # fmt: skip
    results = {
        "AdamW": train("AdamW", lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr), cfg, args, val),
        # ---- auto mode: the per-layer estimator and sample count come from fisher_optim.selection ----
        "FisherAdam": train(
            "FisherAdam", lambda m: FisherAdam(m, likelihood="categorical", estimator="auto", lr=args.lr), cfg, args,
            val,
        ),
    }
    opt = results["FisherAdam"]["opt"]
    report = opt.fisher_report()
    opt.close()
    lines = ["## FisherAdam(auto): the last selection's choice per parameter tensor", "",
             "rse: the predicted relative standard error of the running Fisher estimate; cost: the tensor's "
             f"predicted share of one refresh; reason: the selection's own words ({report.selections} selection(s), "
             f"{report.refreshes} refreshes in {report.steps} steps).", "", *layer_table(report), "",
             f"Summary: {report.summary or '-'}", ""]  # fmt: skip
    lines += ["## Results", "", "| optimizer | steps | training seconds | validation NLL (nats/char) | step times |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, h in results.items():
        times = "; ".join(f"{k}: {v}" for k, v in step_times(h).items())
        lines.append(f"| {name} | {h['step'][-1]} | {h['seconds'][-1]:.1f} | {h['val'][-1]:.3f} | {times} |")
    stops = [f"{name}: {h['stopped']}" for name, h in results.items() if h["stopped"]]
    lines += ["", *(f"* {s}" for s in stops), "" if stops else "", "## Generated text (temperature 0.7, prompt "
              f"{PROMPT!r})", ""]  # fmt: skip
    for name, h in results.items():
        text = generate(h["model"], cfg, 40 if args.smoke else 300, args.seed)
        lines += [f"{name}:", "", "```", *text.splitlines()[:6], "```", ""]
    print("\n" + "\n".join(lines))
    total = time.perf_counter() - t_start
    load1 = os.getloadavg()[0]
    footer = (f"Whole run {total:.0f} s; load average {load0:.2f} at the start, {load1:.2f} at the end "
              f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s)).")  # fmt: skip
    print(footer)
    if str(args.out_dir):
        command = shlex.join(["python", "examples/demo.py", *argv])
        args.out_dir.mkdir(parents=True, exist_ok=True)
        png, md = args.out_dir / "demo_lm.png", args.out_dir / "demo_lm.md"
        plot(results, cfg, png, command)
        md.write_text(f"# make demo: FisherAdam(auto) beside AdamW on the char Transformer LM\n\nCommand: `{command}` "
                      f"(`make demo`); plot: `{png.name}`.\n\n" + "\n".join(lines) + "\n" + footer + "\n")  # fmt: skip
        print(f"\nsaved {png} and {md}")
    return results


if __name__ == "__main__":
    main()
