"""FisherSettings: one validated value for the optimizers' estimation settings; the 0.1.0 keywords still work."""

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from fisher_optim import FisherAdam, FisherSettings, NaturalGradient, ScheduleFreeFisherAdam


def test_defaults_and_frozen():
    s = FisherSettings()
    assert (s.estimator, s.n_samples, s.fisher_interval, s.fisher_batch, s.target_rse) == ("auto", 1, 10, 32, 0.1)
    assert s.select_interval is None and s.select_refreshes == 50 and s.cost_unit == "s"
    assert FisherSettings(cost_model="flops").cost_unit == "param-units"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.estimator = "exact"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(estimator="nope"), r"Invalid estimator: 'nope'"),
        (dict(n_samples=0), r"Invalid n_samples: 0"),
        (dict(fisher_interval=True), r"Invalid fisher_interval: True"),
        (dict(fisher_batch=0), r"Invalid fisher_batch: 0"),
        (dict(target_rse=0), r"Invalid target_rse: 0"),
        (dict(select_interval=0), r"Invalid select_interval: 0"),
        (dict(fisher_interval=3, select_interval=10), r"Invalid select_interval: 10. Must be a multiple"),
        (dict(max_samples=1.5), r"Invalid max_samples: 1.5"),
        (dict(cost_model="x"), r"Invalid cost_model: 'x'. Must be 'measured' or 'flops'"),
        (dict(nonfinite="x"), r"Invalid nonfinite: 'x'. Must be 'skip' or 'raise'"),
        (dict(seed=-1), r"Invalid seed: -1"),
        (dict(output=1.5), r"Invalid output: 1.5"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FisherSettings(**kwargs)


def test_build_from_keywords_and_the_010_variance_interval():
    assert FisherSettings.build() == FisherSettings()
    base = FisherSettings(estimator="exact")
    assert FisherSettings.build(base, n_samples=3) == FisherSettings(estimator="exact", n_samples=3)
    # variance_interval counted refreshes; select_interval counts steps
    s = FisherSettings.build(fisher_interval=4, variance_interval=5)
    assert s.select_interval == 20 and s.select_refreshes == 5
    with pytest.raises(TypeError, match="not both"):
        FisherSettings.build(variance_interval=5, select_interval=50)
    with pytest.raises(ValueError, match="Invalid variance_interval: 0"):
        FisherSettings.build(variance_interval=0)
    with pytest.raises(TypeError, match=r"FisherAdam\(\) got an unexpected keyword argument 'estimatr'"):
        FisherSettings.build(owner="FisherAdam", estimatr="exact")
    with pytest.raises(TypeError, match="settings must be a FisherSettings"):
        FisherSettings.build({"estimator": "exact"})


@pytest.mark.parametrize("cls", [FisherAdam, NaturalGradient, ScheduleFreeFisherAdam])
def test_optimizers_take_settings_or_keywords(cls):
    assert len(inspect.signature(cls.__init__).parameters) - 1 <= 12  # self excluded
    net = nn.Linear(3, 2)
    a = cls(net, settings=FisherSettings(estimator="exact", fisher_interval=2, select_interval=6, seed=1))
    b = cls(net, estimator="exact", fisher_interval=2, variance_interval=3, seed=1)
    assert a.settings == b.settings and a.variance_interval == b.variance_interval == 3
    assert (a.estimator, a.fisher_interval, a.select_interval) == ("exact", 2, 6)
    assert a.schedule.select_interval == 3 and a.fisher_decay == 0.99
    with pytest.raises(AttributeError):
        a.estimator = "mc1"
    a.nonfinite = "raise"  # the one setting that may change during training, validated
    assert a.settings.nonfinite == "raise"
    with pytest.raises(ValueError, match="Invalid nonfinite"):
        a.nonfinite = "ignore"
    with pytest.raises(TypeError, match="unexpected keyword argument 'fisher_intervall'"):
        cls(net, fisher_intervall=3)
    for o in (a, b):
        o.close()


def test_report_costs_carry_their_unit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = FisherAdam(net, fisher_interval=1, cost_model="flops", seed=0)
    for _ in range(2):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    rep = opt.fisher_report()
    assert rep.cost_unit == "param-units" and "cost [param-units]" in rep.table()
    opt.close()
