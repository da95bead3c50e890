"""The λ controller (dsmoe/train/lambda_control.py) on synthetic plants: bounded, settles, no overshoot.

Two plants stand for "activation as a lagged function of λ":
- `lagged`: the activation relaxes with time constant `lag` steps towards a*(λ) = 1 / (1 + (λ/λ0)^p);
- `gates`: the gate logits of a population of tokens (mean m, spread 1) move by up to `speed` per
  step, down while λ exceeds the λ at which the LM loss holds them (which rises as more experts
  close), up otherwise; the activation is the share of logits above 0. Started at m = 3 it has a
  dead time (activation stays at ~1 while the logits travel), like a calibrated init.
Stated bound: the activation never falls more than 0.05 below the target (overshoot), and ends
within 0.03 of it; λ never leaves [lambda_min, lambda_max].
"""

import math
import random
from statistics import NormalDist

import pytest

from dsmoe.config import validate_config
from dsmoe.train.lambda_control import LambdaControl, lambda_controller

TARGET, OVERSHOOT, SETTLED = 0.375, 0.05, 0.03


def controller(**overrides):
    settings = validate_config({"train": {"adaptive_sparsity": {"enabled": True, **overrides}}})["train"]
    return lambda_controller(settings, 1.0, "dsmoe")


def run_lagged(control, steps, lag, lam0=3.0, power=2.0, noise=0.0, seed=0):
    rng, activation, trace = random.Random(seed), 1.0, []
    for _ in range(steps):
        lam = control.lam
        trace.append((activation, lam))
        control.update(min(1.0, max(0.0, activation + noise * rng.gauss(0, 1))))
        activation += (1 / (1 + (lam / lam0) ** power) - activation) / lag
    return trace


def run_gates(control, steps, speed, start=3.0, hold=1.0, hardening=3.0, noise=0.0, seed=0):
    rng, mean, trace = random.Random(seed), start, []
    for _ in range(steps):
        activation, lam = NormalDist().cdf(mean), control.lam
        trace.append((activation, lam))
        control.update(min(1.0, max(0.0, activation + noise * rng.gauss(0, 1))))
        held_at = hold * math.exp(hardening * (1 - activation))
        mean -= speed * math.tanh(math.log(lam / held_at))
    return trace


def check(trace, control):
    activations = [a for a, _ in trace]
    assert all(control.lambda_min * (1 - 1e-12) <= lam <= control.lambda_max * (1 + 1e-12) for _, lam in trace)
    assert min(activations) >= TARGET - OVERSHOOT, f"overshoot: activation fell to {min(activations):.3f}"
    assert all(abs(a - TARGET) < SETTLED for a in activations[-50:]), f"not settled: ends at {activations[-1]:.3f}"


@pytest.mark.parametrize("lag", [1, 5, 20])
@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_settles_on_a_lagged_plant(lag, noise):
    control = controller(ramp_steps=100)
    check(run_lagged(control, 400, lag, noise=noise), control)


@pytest.mark.parametrize("speed", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_settles_on_gates_with_a_dead_time(speed, noise):
    control = controller(ramp_steps=100)
    check(run_gates(control, 400, speed, noise=noise), control)


def test_activation_falls_smoothly_along_the_ramp():
    control = controller(ramp_steps=100)
    activations = [a for a, _ in run_gates(control, 200, 0.1)]
    drops = [b - a for a, b in zip(activations, activations[1:])]
    assert max(drops) < 0.02 and -min(drops) < 0.03  # no step jumps by more than 3 points of activation


def test_lambda_stays_in_bounds_whatever_the_activation():
    control = controller(lambda_min=0.1, lambda_max=10.0, max_step=0.2)
    lams = [control.update(1.0) for _ in range(600)]  # experts never close: λ climbs to the ceiling, no further
    assert max(lams) == pytest.approx(10.0) and all(b / a <= math.exp(0.2) + 1e-9 for a, b in zip(lams, lams[1:]))
    lams = [control.update(0.0) for _ in range(900)]  # all closed: λ falls to the floor
    assert min(lams) == pytest.approx(0.1)
    assert control.update(float("nan")) == pytest.approx(0.1)  # a NaN activation leaves λ alone


def test_multiplying_by_a_rate_explodes_on_the_same_plant():
    """The earlier rule (λ x 1.2 per step while too dense) on the dead-time plant: λ runs away and the
    activation collapses far below the target, as it did on SmolLM2."""

    class Multiply:
        lam, lambda_min, lambda_max = 1.0, 0.0, math.inf

        def update(self, activation):
            self.lam *= 1.2 if activation > TARGET else 1 / 1.2
            return self.lam

    trace = run_gates(Multiply(), 200, 0.1)
    assert max(lam for _, lam in trace) > 1e3 and min(a for a, _ in trace) < TARGET - 0.2


def test_state_round_trip_continues_exactly():
    first = controller(ramp_steps=30)
    run_gates(first, 40, 0.1, noise=0.02)
    second = controller(ramp_steps=30)
    second.load_state_dict(first.state_dict())
    assert [first.update(a) for a in (0.5, 0.45, 0.4)] == [second.update(a) for a in (0.5, 0.45, 0.4)]


def test_off_and_bad_settings():
    settings = validate_config({})["train"]
    assert lambda_controller(settings, 1.0, "dsmoe") is None  # off by default
    settings["adaptive_sparsity"]["enabled"] = True
    assert lambda_controller(settings, 1.0, "topk") is None and lambda_controller(settings, 1.0, "dense") is None
    assert lambda_controller(settings, 1e6, "dsmoe").lam == pytest.approx(settings["adaptive_sparsity"]["lambda_max"])
    with pytest.raises(ValueError, match="lambda_min"):
        LambdaControl(0.4, lambda_min=2.0, lambda_max=1.0, smoothing=0.5, gain=1, integral_gain=1, max_step=0.1)
