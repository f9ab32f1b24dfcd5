"""SoftToHard: soft with geometric sharpening, then hard decisions, on every FFF of a model."""

import math

import pytest
from torch import nn

from topotorch.layers import FFF
from topotorch.layers.fff_schedule import SoftToHard


def test_phases_and_sharpness_follow_the_schedule():
    model = nn.Sequential(nn.Linear(3, 4), FFF(4, 2, 5, 2), nn.ReLU(), FFF(5, 1, 2, 1))
    schedule = SoftToHard(model, total_steps=100, hard_frac=0.25, final_sharpness=16.0)
    assert schedule.soft_steps == 75 and len(schedule.layers) == 2
    assert schedule.step(0) == "soft"
    assert all(m.sharpness == 1.0 and not m.train_hardened for m in schedule.layers)
    schedule.step(30)
    assert all(math.isclose(m.sharpness, 16.0 ** (30 / 75)) for m in schedule.layers)
    assert schedule.step(74) == "soft" and schedule.step(75) == "hard"
    assert all(m.train_hardened and m.sharpness == 16.0 for m in schedule.layers)
    schedule.finish()
    assert not any(m.train_hardened for m in schedule.layers)
    assert all(m.sharpness == 16.0 for m in schedule.layers)  # the temperature it was trained to


def test_hard_frac_extremes():
    layer = FFF(3, 2, 2, 2)
    assert SoftToHard(layer, 10, hard_frac=1.0, final_sharpness=5.0).step(0) == "hard"
    assert layer.sharpness == 5.0  # a run that starts (or resumes) in the hard phase: same gradients
    assert SoftToHard(layer, 10, hard_frac=0.0).step(9) == "soft"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"hard_frac": 1.5}, "hard_frac"),
        ({"final_sharpness": 0.5}, "final_sharpness"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftToHard(FFF(3, 2, 2, 2), **{"total_steps": 10, **kwargs})


def test_a_model_without_fff_is_an_error():
    with pytest.raises(ValueError, match="no FFF layer"):
        SoftToHard(nn.Linear(2, 2), 10)
