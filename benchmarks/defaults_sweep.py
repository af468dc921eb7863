r"""Do FisherAdam's and NaturalGradient's defaults hold beyond MLPs?  A hyperparameter sweep (issue 11, part 7).

For every model below, each optimizer trains ``--steps`` steps (default 100) from the same initial weights on
the same mini-batches (batch 16, sampled with replacement from a fixed training set); the score is the
**training loss**: the mean cross-entropy over the whole training set after the last step, computed with the
model as it was trained (BatchNorm with each batch's own statistics, batches of 16; dropout off).  The goal
(issue 11): with their defaults, FisherAdam and NaturalGradient reach at most AdamW(lr=1e-3)'s final loss.

The sweep varies one hyperparameter at a time around the defaults (lr, clip, damping, fisher_interval; the
other arguments as in the constructors), plus FisherAdam's alternatives to the clip (Adam's signal term
``signal=True, clip=None``; a Fisher floor relative to each tensor's mean, ``floor=0.1``) and its 0.1.0 update
(per-input units ``units="input"`` at 0.1.0's lr 5e-3), and ScheduleFreeFisherAdam against Schedule-Free AdamW.
Schedule-Free runs are scored at their average ``x`` (``opt.eval()`` before the score).  Issue 19's goal:
FisherAdam's defaults at or below AdamW(lr=1e-3)'s loss on at least 6 of the 7 models.

Models (all 10 classes, sklearn's 8x8 digits, pixels/16; 256 training inputs):

==============  ==================================================================================
key             model
==============  ==================================================================================
``logreg``      ``nn.Linear(64, 10)`` on the flattened digits (the optimizer suite's ``logreg``)
``cnn``         the optimizer suite's small CNN (``benchmarks.models.small_cnn``), digits upsampled to 28x28
``resnet18``    torchvision ``resnet18(num_classes=10)``, train mode (BatchNorm), digits upsampled to 3x32x32
``mobilenet``   torchvision ``mobilenet_v3_small(num_classes=10)``, train mode, 3x32x32
``vit``         torchvision ``VisionTransformer`` image 16, patch 4, 2 layers, 2 heads, hidden 32, MLP 64; 3x16x16
``transformer`` ``nn.TransformerEncoder`` (d=32, 2 heads, 2 layers, FF 64, no dropout) over the 8 pixel rows
                as 8 tokens (+ learned positions), mean-pooled, linear head
``lstm``        ``nn.LSTM(8, 64)`` over the 8 pixel rows, last hidden state, linear head
==============  ==================================================================================

Run: ``python -m benchmarks.defaults_sweep`` (about 20 minutes on one thread) writes
``benchmarks/results/defaults_sweep.md``; ``--smoke`` runs every model for a few steps in seconds.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data, models  # noqa: E402
from benchmarks._common import machine_info  # noqa: E402
from benchmarks.data import digits_as_image as as_image  # noqa: E402
from fisher_optim.optim import FisherAdam, NaturalGradient, ScheduleFreeFisherAdam  # noqa: E402

CLASSES = {"fisher_adam": FisherAdam, "sf_fisher_adam": ScheduleFreeFisherAdam, "natural_gradient": NaturalGradient}

RESULTS = Path(__file__).resolve().parent / "results" / "defaults_sweep.md"
BATCH = 16
N_TRAIN = 256


# -- data and models (benchmarks/data.py, benchmarks/models.py) ------------------------------------------
def digits(n: int = N_TRAIN) -> tuple[Tensor, Tensor]:
    """The first ``n`` of sklearn's digits after a fixed shuffle (seed 0): (n, 8, 8) in [0, 1] and labels."""
    return data.digits(n, seed=0, square=True)


@dataclass
class Model:
    key: str
    build: Callable[[], nn.Module]
    inputs: Callable[[Tensor], Tensor]  # (n, 8, 8) digits -> model inputs
    note: str = ""


MODELS = {
    m.key: m
    for m in [
        Model("logreg", lambda: nn.Linear(64, 10), lambda x: x.reshape(len(x), 64)),
        Model("cnn", models.small_cnn, lambda x: as_image(x, 28, 1)),
        Model("resnet18", models.resnet18, lambda x: as_image(x, 32, 3)),
        Model("mobilenet", models.mobilenet_v3_small, lambda x: as_image(x, 32, 3)),
        Model("vit", models.vit, lambda x: as_image(x, 16, 3)),
        Model("transformer", models.SeqTransformer, lambda x: x),
        Model("lstm", models.SeqLSTM, lambda x: x),
    ]
}


# -- configurations ---------------------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    kind: str  # "adamw", "schedulefree_adamw" or a key of CLASSES
    kwargs: dict = field(default_factory=dict)
    smoke: bool = False  # run in --smoke mode too


def constructor_defaults(cls) -> dict:
    """The hyperparameters of the sweep as ``cls``'s signature (and :class:`fisher_optim.FisherSettings`, for the
    estimation settings) set them, so the table follows the code."""
    from fisher_optim import FisherSettings

    sig = inspect.signature(cls.__init__).parameters
    out = {k: sig[k].default for k in ("lr", "clip", "damping") if k in sig}
    for k in ("fisher_interval", "floor", "signal"):
        out[k] = getattr(FisherSettings(), k)
    return out


def _g(v) -> str:
    return "None" if v is None else f"{v:g}"


def configs(estimator: str) -> list[Config]:
    """AdamW baselines; per Fisher optimizer its defaults, then one hyperparameter changed at a time."""
    out = [Config("AdamW lr=1e-3", "adamw", {"lr": 1e-3}, True), Config("AdamW lr=3e-3", "adamw", {"lr": 3e-3}),
           Config("Schedule-Free AdamW defaults (lr=0.0025)", "schedulefree_adamw", {}, True)]  # fmt: skip
    grids = {
        "fisher_adam": dict(lr=(3e-4, 1e-3, 3e-3, 1e-2), clip=(0.3, 1.0, None), damping=(0.0, 1e-4),
                            fisher_interval=(1, 10, 50)),
        "sf_fisher_adam": dict(lr=(1e-3, 2.5e-3, 1e-2), clip=(0.3, 1.0, None)),
        "natural_gradient": dict(lr=(1e-3, 2e-3, 5e-3, 1e-2), clip=(0.3, 1.0, None),
                                 damping=(1e-4, 1e-3, 1e-2), fisher_interval=(1, 10, 50)),
    }  # fmt: skip
    for kind, cls in CLASSES.items():
        title = cls.__name__
        d = constructor_defaults(cls)
        out.append(Config(f"{title} defaults (" + ", ".join(f"{k}={_g(v)}" for k, v in d.items() if k in grids[kind])
                          + ")", kind, {"estimator": estimator}, True))  # fmt: skip
        for k, values in grids[kind].items():
            for v in values:
                if v != d[k]:
                    out.append(Config(f"{title} {k}={_g(v)}", kind, {"estimator": estimator, k: v}))
        if kind == "fisher_adam":
            out.append(Config("FisherAdam signal=True, clip=None (Adam's signal term instead of the clip)", kind,
                              {"estimator": estimator, "signal": True, "clip": None}))  # fmt: skip
            out.append(Config("FisherAdam floor=0.1", kind, {"estimator": estimator, "floor": 0.1}))
            out.append(Config("FisherAdam 0.1.0 (units=input, lr=5e-3, clip=1)", kind,
                              {"estimator": estimator, "units": "input", "lr": 5e-3}, True))  # fmt: skip
    return out


SLOW = {"resnet18", "mobilenet"}
"""Models whose refresh is costly (train-mode BatchNorm): ``fisher_interval=1`` is left out of the sweep there
(one such ResNet-18 run took 165 s against 15 s with the default interval, on the machine of the results)."""


def make_optimizer(cfg: Config, model: nn.Module):
    if cfg.kind == "adamw":
        return torch.optim.AdamW(model.parameters(), **cfg.kwargs)
    if cfg.kind == "schedulefree_adamw":
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(model.parameters(), **cfg.kwargs)
        opt.train()
        return opt
    return CLASSES[cfg.kind](model, "categorical", seed=0, **cfg.kwargs)


# -- training ---------------------------------------------------------------------------------------------
@torch.no_grad()
def train_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy over the training set, in train mode (batch statistics) with dropout off; buffers
    restored."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    drop = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in drop:
        m.eval()
    try:
        total = sum(float(F.cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH], reduction="sum"))
                    for i in range(0, len(x), BATCH))  # fmt: skip
        return total / len(x)
    finally:
        for m in drop:
            m.train()
        model.load_state_dict(buffers, strict=False)


def run(model_def: Model, cfg: Config, x: Tensor, y: Tensor, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = model_def.build()
    model.train()
    opt = make_optimizer(cfg, model)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    first_step = math.nan
    skipped = 0
    for t in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            skipped = -1  # diverged
            break
        loss.backward()
        s0 = time.perf_counter()
        opt.step()
        if t == 0:
            first_step = time.perf_counter() - s0
    wall = time.perf_counter() - t0
    if hasattr(opt, "eval"):  # Schedule-Free: the average x is the model that is scored
        opt.eval()
    final = train_loss(model, x, y) if skipped == 0 else math.nan
    if hasattr(opt, "close"):
        opt.close()
    return {"loss": final if math.isfinite(final) else math.nan, "wall_s": wall, "first_step_s": first_step,
            "steps": steps}


# -- report -----------------------------------------------------------------------------------------------
def fmt(v: float) -> str:
    return "diverged" if not math.isfinite(v) else f"{v:.3f}" if v < 1e3 else f"{v:.2g}"


def report(results: dict, cfgs: list[Config], args, argv: list[str], total_s: float, auto: dict) -> str:
    import torchvision

    import fisher_optim

    keys = list(results)
    base = {k: results[k]["AdamW lr=1e-3"]["loss"] for k in keys}
    defaults = [c.name for c in cfgs if "defaults" in c.name]

    def won(k: str, name: str) -> bool:
        v = results[k][name]["loss"]
        return math.isfinite(v) and v <= base[k]

    lines = [
        "# Defaults beyond MLPs: FisherAdam and NaturalGradient hyperparameter sweep",
        "",
        f"Made by `python -m benchmarks.defaults_sweep {' '.join(argv)}` (`benchmarks/defaults_sweep.py`), "
        f"{total_s / 60:.1f} min in all.",
        "",
        f"Machine: {machine_info()}; torchvision {torchvision.__version__}; fisher_optim "
        f"{getattr(fisher_optim, '__version__', '?')}.",
        "",
        f"Protocol: {args.steps} steps, batch {BATCH} sampled with replacement from {len(auto_x['digits'])} "
        f"sklearn digits (the same batches and initial weights for every optimizer; seed {args.seed}, one seed). "
        f"Score: the training loss after the last step, mean cross-entropy over the training inputs in train mode "
        f"(BatchNorm with batch statistics, batches of {BATCH}, dropout off). Fisher optimizers use "
        f"`estimator=\"{args.estimator}\"` unless said; every other argument is the constructor default. "
        f"**Bold**: at most AdamW(lr=1e-3)'s loss. Models: see the module docstring of the script.",
        "",
        "## The goal: defaults reach AdamW(lr=1e-3)'s training loss",
        "",
        "| model | AdamW lr=1e-3 | " + " | ".join(n.split(" (")[0] for n in defaults) + " |",
        "|---|---:|" + "---:|" * len(defaults),
    ]
    for k in keys:
        cells = [f"{fmt(results[k][n]['loss'])} {'met' if won(k, n) else '**missed**'}" for n in defaults]
        lines.append(f"| {k} | {fmt(base[k])} | " + " | ".join(cells) + " |")
    lines += ["", "## The sweep (final training loss)", "",
              "| optimizer | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]  # fmt: skip
    for cfg in cfgs:
        cells = []
        for k in keys:
            if cfg.name not in results[k]:
                cells.append("-")
                continue
            s = fmt(results[k][cfg.name]["loss"])
            cells.append(f"**{s}**" if cfg.kind != "adamw" and won(k, cfg.name) else s)
        lines.append(f"| {cfg.name} | " + " | ".join(cells) + " |")
    lines += ["", "`-`: not run (`fisher_interval=1` on the train-mode BatchNorm models: see `SLOW` in the script).",
              "", "## Cost", "", f"Wall-clock seconds of the {args.steps} training steps, one thread:", "",
              "| optimizer | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]  # fmt: skip
    for cfg in cfgs:
        if cfg.name in ("AdamW lr=1e-3", *defaults) or "fisher_interval" in cfg.name:
            cells = [f"{results[k][cfg.name]['wall_s']:.1f}" if cfg.name in results[k] else "-" for k in keys]
            lines.append(f"| {cfg.name.split(' (')[0]} | " + " | ".join(cells) + " |")
    if auto:
        lines += ["", '`estimator="auto"` (the constructors\' default estimator) with the other defaults: seconds of '
                  "the first `step()` (auto's first refresh is exact), of the whole run, and its final loss "
                  f"(on {', '.join(sorted(SLOW))} only the first {args.auto_slow_steps} step(s): no loss):", "",
                  "| optimizer | " + " | ".join(auto) + " |", "|---|" + "---:|" * len(auto)]  # fmt: skip
        for name in next(iter(auto.values())):
            row = []
            for k in auto:
                r = auto[k][name]
                loss = f"loss {fmt(r['loss'])}, " if r["steps"] == args.steps else ""
                row.append(f"{loss}{r['first_step_s']:.2f} s / {r['wall_s']:.1f} s")
            lines.append(f"| {name.split(' (')[0]} auto | " + " | ".join(row) + " |")
    lines += ["", "## Reading (generated from the tables)", "", *reading(results, cfgs), "", NOTES.strip(), ""]
    return "\n".join(lines)


NOTES = """
Why no single lr wins every model (read from the lr rows above): FisherAdam divides by the Fisher of the training
loss, so at equal lr its steps are about Adam's (its rows track ``AdamW lr=3e-3`` at ``lr=0.003``), and the models
split as they do for Adam: the train-mode BatchNorm networks (ResNet-18, MobileNetV3) end lowest at small lrs, the
logistic regression, the CNN, the Transformer and the LSTM at larger ones.  Among the lrs swept, the default
meets AdamW(lr=1e-3) on as many models as any other; the clip, the signal term, the floor and the Fisher interval
rows show what the alternatives to the defaults change.  ScheduleFreeFisherAdam is compared with AdamW(lr=1e-3)
(the goal's reference) and Schedule-Free AdamW at its defaults, both scored at their averages ``x``.  One seed,
100 steps: differences of a few per cent are noise.
"""


def reading(results: dict, cfgs: list[Config]) -> list[str]:
    """Generated lines: per defaults row the models where it meets AdamW(lr=1e-3), and per Fisher optimizer the
    best lr row per model."""
    keys = list(results)
    base = {k: results[k]["AdamW lr=1e-3"]["loss"] for k in keys}
    out = []
    for c in cfgs:
        if "defaults" not in c.name or c.kind == "adamw":
            continue
        met = [k for k in keys if math.isfinite(results[k][c.name]["loss"]) and results[k][c.name]["loss"] <= base[k]]
        out.append(f"- {c.name}: at or below AdamW(lr=1e-3)'s loss on {len(met)} of {len(keys)} models"
                   f" ({', '.join(met) or 'none'}; missed: {', '.join(k for k in keys if k not in met) or 'none'}).")
    for kind, cls in CLASSES.items():
        rows = [c for c in cfgs if c.kind == kind and ("defaults" in c.name or " lr=" in c.name)]
        if not rows:
            continue
        best = []
        for k in keys:
            r = min(rows, key=lambda c: results[k][c.name]["loss"] if math.isfinite(results[k][c.name]["loss"])
                    else math.inf)  # fmt: skip
            best.append(f"{k} {r.name.split(' (')[0].replace(cls.__name__ + ' ', '')}")
        out.append(f"- {cls.__name__}, the lr row with the lowest loss per model: " + "; ".join(best) + ".")
    return out



auto_x: dict = {}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few steps, a few configurations: seconds")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 100; smoke 3)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--estimator", default="mc1", help="estimator of the sweep (default mc1)")
    p.add_argument("--auto", default=None, help="models that also run the defaults with estimator='auto' "
                   "(comma-separated; default: every model in a full run, none in smoke)")  # fmt: skip
    p.add_argument("--auto-slow-steps", type=int, default=1, help="steps of the auto runs on " + ",".join(SLOW))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="report path (default benchmarks/results/defaults_sweep.md; "
                   "smoke: no report unless given)")  # fmt: skip
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.smoke else 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    log = logging.getLogger("fisher_optim")
    level = log.level
    log.setLevel(logging.ERROR)  # skipped-step warnings of diverging runs
    try:
        t_all = time.perf_counter()
        x8, y = digits(32 if args.smoke else N_TRAIN)
        auto_x["digits"] = x8
        cfgs = [c for c in configs(args.estimator) if c.smoke or not args.smoke]
        keys = [k for k in args.models.split(",") if k]
        results: dict = {}
        for key in keys:
            m = MODELS[key]
            x = m.inputs(x8)
            results[key] = {}
            for cfg in cfgs:
                if key in SLOW and cfg.kwargs.get("fisher_interval") == 1:
                    continue
                r = run(m, cfg, x, y, args.steps, args.seed)
                results[key][cfg.name] = r
                print(f"{key:12s} {cfg.name:60s} loss {fmt(r['loss']):>9s}  {r['wall_s']:6.1f} s", flush=True)
        out = args.out or (None if args.smoke else str(RESULTS))
        path = None
        if out:
            path = Path(out)
            if path.is_dir():
                path = path / "defaults_sweep.md"
            # written now and again after the auto runs (an exact first refresh can be slow on big models)
            path.write_text(report(results, cfgs, args, argv, time.perf_counter() - t_all, {}))
        auto_keys = args.auto.split(",") if args.auto is not None else ([] if args.smoke else keys)
        auto: dict = {}
        for key in [k for k in auto_keys if k]:
            m = MODELS[key]
            x = m.inputs(x8)
            auto[key] = {}
            steps = args.auto_slow_steps if key in SLOW else args.steps
            for kind, name in (("fisher_adam", "FisherAdam defaults"),
                               ("natural_gradient", "NaturalGradient defaults")):  # fmt: skip
                r = run(m, Config(name, kind, {"estimator": "auto"}), x, y, steps, args.seed)
                auto[key][name] = r
                print(f"{key:12s} {name + ' auto':60s} loss {fmt(r['loss']):>9s}  first step {r['first_step_s']:.2f} s"
                      f"  {r['wall_s']:6.1f} s", flush=True)  # fmt: skip
        text = report(results, cfgs, args, argv, time.perf_counter() - t_all, auto)
        if path is not None:
            path.write_text(text)
        return {"results": results, "auto": auto, "report": text, "configs": cfgs}
    finally:
        torch.set_num_threads(threads)
        log.setLevel(level)


if __name__ == "__main__":
    main()
