"""DDP: two CPU processes on the gloo backend train a DistributedDataParallel model with FisherAdam on different
batches; the Fisher estimates are averaged at every refresh, so both ranks must end with identical parameters
and identical optimizer state, and in auto mode identical per-layer choices (rank 0's, broadcast)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fisher_optim import diagonal_fisher

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)

WORLD = 2
CONFIGS = {
    "exact": dict(estimator="exact"),
    "mc1": dict(estimator="mc1", n_samples=2),
    "auto": dict(estimator="auto"),  # measured costs differ per rank: the plan must come from rank 0
    "schedule_free": dict(estimator="mc1", n_samples=2, schedule_free=True),  # ScheduleFreeFisherAdam
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 3)).double()


def rank_batch(rank: int, i: int):
    g = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fisher_optim.optim import FisherAdam, ScheduleFreeFisherAdam

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for tag, kw in CONFIGS.items():
            net = make_model()
            model = DDP(net)
            kw = dict(kw)
            cls = ScheduleFreeFisherAdam if kw.pop("schedule_free", False) else FisherAdam
            opt = cls(model, fisher_interval=2, betas=(0.9, 0.5), seed=0, **kw)
            first_ema = None
            for i in range(5):
                x, y = rank_batch(rank, i)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                if i == 0:
                    first_ema = {n: opt.state[p]["fisher_ema"].clone() for n, p in net.named_parameters()}
            out[tag] = {
                "params": {n: p.detach().clone() for n, p in net.named_parameters()},
                "state": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters()},
                "first_ema": first_ema,
                "choices": {n: (r["estimator"], r["n_samples"]) for n, r in opt.fisher_report().items()},
                "adam_scale": opt.loss_scale.adam_scale,
            }
            opt.close()
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_stay_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for tag in CONFIGS:
        a, b = r0[tag], r1[tag]
        for n in a["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), (tag, n)
            assert a["state"][n].keys() == b["state"][n].keys()
            for k in a["state"][n]:
                assert torch.equal(a["state"][n][k], b["state"][n][k]), (tag, n, k)
        assert a["choices"] == b["choices"], tag
        assert a["adam_scale"] == b["adam_scale"] == 1 / (6 * WORLD), tag  # B: the inputs of both ranks
        assert not torch.equal(a["params"]["0.weight"], make_model()[0].weight)  # it did train
    # the first refresh holds the mean over ranks of each rank's own exact estimate (beta2 = 0.5); in auto mode it
    # is a selection's refresh: rank 0's from its selection, the other rank's from estimate_plan, then all-reduced
    net = make_model()
    local = [
        diagonal_fisher(net, rank_batch(r, 0)[0], likelihood="categorical", estimator="exact") for r in range(WORLD)
    ]
    for tag in ("exact", "auto"):
        for n, ema in r0[tag]["first_ema"].items():
            torch.testing.assert_close(ema / 0.5, (local[0][n] + local[1][n]) / 2, rtol=1e-12, atol=1e-15)
            assert not torch.allclose(local[0][n], local[1][n])  # the ranks did see different data
