"""The refresh/selection schedule run without a model (``fisher_optim.schedule``), and old checkpoints."""

import math

import pytest
import torch
from torch import nn

import fisher_optim.schedule as schedule_mod
from fisher_optim import FisherAdam, NaturalGradient, Schedule
from fisher_optim.schedule import COST_CACHE_SIZE, COST_REUSE, SELECT_BACKOFF_MAX, next_select_interval

NAMES = ["0.weight", "0.bias"]


def choices(est="mc1", n=2):
    return {k: dict(estimator=est, n_samples=n, rse=0.05, cost=1.0, reason="r") for k in NAMES}


def run(sch: Schedule, steps: int, changed=lambda i: i == 0) -> list[tuple[int, str]]:
    """Drive ``sch`` as the optimizer does: ``(step, kind)`` of every refresh (kind: exact, select or plan).
    ``changed(i)``: whether selection ``i`` changes the plan (the first always does: there is none before it)."""
    out = []
    for step in range(steps):
        if sch.refresh_due():
            if sch.select_due(NAMES):
                sch.after_selection(choices(), changed(sch.selections))
                kind = "select"
            else:
                kind = "exact" if sch.plan_for(NAMES) == {n: ("exact", 1) for n in NAMES} else "plan"
            sch.after_refresh()
            out.append((step, kind))
        sch.after_step()
    return out


def test_next_select_interval():
    assert next_select_interval(50, 50, changed=False) == 100
    assert next_select_interval(400, 50, changed=False) == 400
    assert next_select_interval(400, 50, changed=True) == 50
    assert SELECT_BACKOFF_MAX == 8


def test_refreshes_every_fisher_interval_steps_and_on_missing_state():
    sch = Schedule(fisher_interval=3, select_interval=50)
    assert [s for s, _ in run(sch, 10)] == [0, 3, 6, 9]
    assert (sch.steps, sch.refreshes, sch.since_refresh) == (10, 4, 1)
    assert not sch.refresh_due() and sch.refresh_due(missing_state=True)


def test_first_refresh_exact_then_selections_back_off_while_the_plan_holds():
    sch = Schedule(fisher_interval=1, select_interval=2)
    kinds = run(sch, 40)
    assert kinds[0] == (0, "exact")
    # selections at refreshes 2, 4, 8, 16, 32 (1-based): intervals 2, 4, 8, 16 (= 8 x 2, capped)
    assert [s + 1 for s, k in kinds if k == "select"] == [2, 4, 8, 16, 32]
    assert all(k == "plan" for s, k in kinds[1:] if s + 1 not in (2, 4, 8, 16, 32))
    assert sch.select_every == 16 == SELECT_BACKOFF_MAX * 2 and sch.selections == 5
    assert sch.plan == {n: ("mc1", 2) for n in NAMES}


def test_a_changed_plan_resets_the_interval():
    sch = Schedule(fisher_interval=1, select_interval=2)
    kinds = run(sch, 12, changed=lambda i: True)
    assert [s + 1 for s, k in kinds if k == "select"] == [2, 4, 6, 8, 10, 12]
    assert sch.select_every == 2


def test_a_parameter_missing_from_the_plan_triggers_a_selection():
    sch = Schedule(fisher_interval=1, select_interval=50)
    run(sch, 3)
    assert not sch.select_due(NAMES) and sch.select_due([*NAMES, "1.weight"])


def test_skip_changes_only_the_skip_counter():
    sch = Schedule(fisher_interval=2, select_interval=2)
    run(sch, 3)
    before = sch.state_dict()
    sch.after_skip()
    after = sch.state_dict()
    assert after["counters"].pop("skipped") == before["counters"].pop("skipped") + 1 and after == before


def test_cost_cache_reuses_then_remeasures_and_keeps_the_newest_keys(monkeypatch):
    sch = Schedule(fisher_interval=1, select_interval=1)
    measured = []
    for i in range(2 * (COST_REUSE + 1)):
        cached = sch.cached_costs("k")
        if cached is None:
            measured.append(i)
        sch.remember_costs("k", cached if cached is not None else f"costs{i}", reused=cached is not None)
    assert measured == [0, COST_REUSE + 1]
    monkeypatch.setattr(schedule_mod, "COST_REUSE", 1)
    assert sch.cached_costs("k") is None  # reused 10 > 1 times
    for k in range(COST_CACHE_SIZE + 2):
        sch.remember_costs(k, k, reused=False)
    assert list(sch.cost_cache) == list(range(2, COST_CACHE_SIZE + 2))
    assert "cache" not in str(sch.state_dict())


def test_state_dict_round_trip_and_old_checkpoints():
    sch = Schedule(fisher_interval=2, select_interval=3)
    run(sch, 20)
    sch.after_selection(choices("exact", 1), True, 2.0, 3.0, "plan: x")
    sd = sch.state_dict()
    other = Schedule(fisher_interval=2, select_interval=3)
    other.load_state_dict(sd)
    assert other.state_dict() == sd and other.plan == sch.plan and other.plan_costs == (2.0, 3.0)
    # a checkpoint saved before the back-off: no select_every, plan_costs, plan_summary
    old = {k: v for k, v in sd.items()}
    dropped = ("select_every", "plan_costs", "plan_summary")
    old["counters"] = {k: v for k, v in sd["counters"].items() if k not in dropped}
    fresh = Schedule(fisher_interval=2, select_interval=3)
    fresh.load_state_dict(old)
    assert fresh.select_every == 3 and math.isnan(fresh.plan_costs[0]) and fresh.plan_summary == ""
    assert fresh.steps == sch.steps and fresh.plan == sch.plan


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _train(net, opt, steps, start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("cls", [FisherAdam, NaturalGradient])
def test_an_optimizer_checkpoint_in_the_010_layout_loads(cls):
    """The ``"fisher_optim"`` entry as 0.1.0 wrote it (built by hand: plan, choices and counters at its top
    level, counters without the back-off's entries) loads, and training continues from its counters and plan."""
    net = _mlp()
    opt = cls(net, fisher_interval=1, variance_interval=2, cost_model="flops", seed=0)
    _train(net, opt, 3)
    sd = opt.state_dict()
    names = [n for n, _ in net.named_parameters()]
    plan = {n: ["mc1", 3] for n in names}
    sd["fisher_optim"] = {
        "generator_state": torch.Generator().manual_seed(5).get_state(),
        "plan": plan,
        "choices": {n: {"estimator": "mc1", "n_samples": 3, "rse": 0.05, "cost": 1.5, "reason": "old"} for n in names},
        "counters": {"steps": 3, "refreshes": 3, "selections": 1, "since_refresh": 1, "since_select": 1,
                     "skipped": 2},  # fmt: skip
        "estimator": "auto",
    }
    resumed = cls(net, fisher_interval=1, variance_interval=2, cost_model="flops", seed=0)
    opt.close()
    resumed.load_state_dict(sd)
    sch = resumed.schedule
    assert sch.plan == {n: ("mc1", 3) for n in names} and sch.select_every == 2 and sch.skipped == 2
    rep = resumed.fisher_report()
    assert (rep.steps, rep.refreshes, rep.selections, rep.skipped_steps) == (3, 3, 1, 2)
    assert rep["0.weight"]["reason"] == "old" and math.isnan(rep.plan_cost)
    _train(net, resumed, 1, start=3)  # since_select 1 < 2: a refresh with the saved plan, no selection
    assert resumed.fisher_report().selections == 1 and resumed.schedule.refreshes == 4
    _train(net, resumed, 1, start=4)  # since_select reaches 2: a selection
    assert resumed.fisher_report().selections == 2
    # the saved layout is still 0.1.0's (plus the back-off's counters and, since 0.2, the loss's size)
    new = resumed.state_dict()["fisher_optim"]
    assert set(new) == {"generator_state", "plan", "choices", "counters", "estimator", "loss_scale"}
    assert new["loss_scale"] == {"inputs": 8, "elements": 1, "world": 1, "reduction": "mean"}
    assert set(new["counters"]) >= {"steps", "refreshes", "selections", "since_refresh", "since_select", "skipped"}
    resumed.close()
