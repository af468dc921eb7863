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
    lines += ["", "## Reading", "", NOTES.strip(), ""]
    return "\n".join(lines)


NOTES = """
Written from this table (seed 0) and from two-seed checks run while choosing (quoted as seed 0 / seed 1).  One
seed: differences of a few per cent are noise.  All runs are 100 steps, as the issue asks (none shortened).

**The defaults chosen.**  FisherAdam ``lr=5e-3`` (was 2e-2), NaturalGradient ``lr=2e-3`` (was 5e-3); clip 1,
damping (0 / 1e-3) and ``fisher_interval=10`` unchanged: no other value of them wins across the models (clip=None
diverges on the CNN and the ViT; clip=0.3 and the dampings trade one model for another; ``fisher_interval=50``
often ends lower at 100 steps but loses MobileNetV3, 1.233).  The lr is a compromise between two groups that no
single value serves: the train-mode BatchNorm networks train best at 1e-3 to 2e-3 (FisherAdam on MobileNetV3:
0.212 at 1e-3, 9.540 at the former 2e-2; on ResNet-18 0.022 at 1e-3, 0.398 at 2e-2), while the logistic
regression, the CNN, the Transformer and the LSTM need 5e-3 or more (at 2e-3 FisherAdam misses all four).
5e-3 meets AdamW on five models of seven for FisherAdam (ResNet-18 is close to the line: 0.151 / 0.171 against
AdamW's 0.211 / 0.150, a miss on seed 1), 2e-3 on four for NaturalGradient (5e-3 on three: it lost the
Transformer, 1.567 / 1.753 against 1.506 / 1.357).

**Where FisherAdam's defaults miss, and why.**

* *MobileNetV3-small* (0.485 against 0.366).  FisherAdam needs lr <= 2e-3 there; a smaller clip does not rescue
  larger lrs (clip=0.3: 0.450; lr=1e-2 with clip=0.25: 0.891 in the checks), so it is the typical step
  ``lr |m| / sqrt(F)`` that is too large, not a few clipped coordinates.  The cause inside the network
  (which layers' Fisher is small against their gradient) was not isolated here.
* *ViT* (2.030 against 1.842).  torchvision zero-initialises the ViT's classification head, so at step 0 the
  gradient **and the Fisher** of every parameter below the head are exactly 0 (checked with ``exact`` and
  ``mc1``).  The first refresh then sets the preconditioner of the whole body to ``1/eps`` until the next
  refresh at step 10: nine steps of clipped sign descent of size ``lr``.  Refreshing every step removes it:
  ``fisher_interval=1`` reaches 1.826 here, and with lr=5e-3 1.826 / 1.449 against AdamW's 1.842 / 1.529 on two
  seeds (``fisher_interval`` 2 and 5 do not: 2.011 / 1.704, 2.047 / 1.697).  Beyond that the ViT prefers
  Adam-sized steps (AdamW at 3e-3 is worse than at 1e-3; with the head re-initialised AdamW reaches
  1.195 / 1.058 and FisherAdam 1.311 / 1.243).  A library fix (refresh again at the next step when a refresh
  finds a parameter's Fisher identically zero, or leave such parameters unpreconditioned until then) is an
  internal change, outside this sweep.

**Where NaturalGradient's defaults miss**: ResNet-18 (0.466 against 0.211), MobileNetV3 (2.805 against 0.366)
and the ViT (1.955 against 1.842), at every lr, clip, damping and interval swept here (best: ResNet-18 0.335
at clip=0.3; MobileNetV3 0.776 at clip=0.3; ViT 1.448 at lr=1e-3, which misses the CNN).  Its step is
``m / (F + damping)``, so where the Fisher is small it is ``m / damping`` and saturates the clip: every such
coordinate moves by ``lr`` per step (sign descent), which these networks do not tolerate at an lr the others
need.  Larger dampings help ResNet-18 in the checks (1e-1: 0.387) and hurt the LSTM (1e-2: 1.513 against
0.863).  Use FisherAdam on BatchNorm CNNs and ViTs.

**Carrying over an lr tuned for Adam.**  Adam's lr used as is (FisherAdam lr=1e-3) is too small on the
non-BatchNorm models: 1.14x (logreg) to 3.5x (CNN) AdamW's loss.  The Fisher of the mini-batch mean loss,
``F/B``, has Adam's scale (Adam's denominator is about ``sqrt(F/B)`` where gradient noise dominates);
preconditioning by it is exactly FisherAdam with ``lr = lr_adam * sqrt(B)`` and ``clip = 1/sqrt(B)`` (the row
``Adam's lr=1e-3 via F/B``).  It lands within 0.98x-1.11x AdamW's loss on logreg, CNN, ViT, Transformer and LSTM,
0.70x on ResNet-18 and 1.9x on MobileNetV3: the lr transfers, and the result is about Adam's, not better.

**auto.**  ``estimator="auto"``'s first refresh is exact: 1.3-1.5 s on ResNet-18 (8-11 AdamW steps of
0.12-0.19 s, over two runs of this script) and 0.3 s on MobileNetV3 (about 6 steps), milliseconds on the others;
affordable at these sizes.  With ``mc1`` and ``fisher_interval=10`` a 100-step run costs about AdamW's on the
two BatchNorm networks and up to 2x on the tiny models, where a step costs milliseconds (the cost table).  Its
100-step losses are in the table above (ResNet-18 and MobileNetV3: first step only, to keep the sweep short).
"""


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
