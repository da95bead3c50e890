"""Beyond the paper: a bounded controller that steers λ towards a target activation.

With a fixed λ (the paper's λ = 1) the activation a training run settles at depends on the model,
the data and the budget; a target fraction of active experts is easier to ask for. A controller
that multiplies λ by a constant rate every step while the experts are too active winds up for as
long as the gates take to respond, then closes them all at once (λ from 2 to 1.2·10⁵ in 65 steps on
SmolLM2). This one cannot:

- it acts on a moving average ā of the activation (mean over layers of active experts / n), with
  weight `smoothing` on the past;
- the target r moves linearly from the first ā to `target_fraction` over `ramp_steps` steps, so
  that the activation is led down smoothly instead of being asked to jump;
- a proportional-integral law on u = ln λ in velocity form: Δu = gain·(e − e_prev) + integral_gain·e,
  e = ā − r; u itself is the integral, so clamping it is the anti-windup;
- each step changes ln λ by at most `max_step`, and λ stays in [lambda_min, lambda_max].

The state (ln λ, ā, e_prev, the ramp's start and the step) goes into trainer_state.json, so a resumed
run continues exactly.
"""

import math
from dataclasses import asdict, dataclass

from .step import SPARSITY_VARIANTS


@dataclass
class LambdaControl:
    """The controller's settings (`train.adaptive_sparsity` in the run config) and its state."""

    target_fraction: float
    lambda_min: float
    lambda_max: float
    smoothing: float
    gain: float
    integral_gain: float
    max_step: float
    ramp_steps: int = 0
    max_error: float = 0.1
    # state
    log_lambda: float = 0.0
    smoothed: float | None = None
    previous_error: float = 0.0
    ramp_start: float | None = None
    steps: int = 0

    def __post_init__(self):
        if not 0 < self.lambda_min <= self.lambda_max:
            raise ValueError(f"need 0 < lambda_min <= lambda_max, got {self.lambda_min}, {self.lambda_max}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")
        if self.max_step <= 0 or self.max_error <= 0 or self.gain < 0 or self.integral_gain < 0 or self.ramp_steps < 0:
            raise ValueError("max_step and max_error must be > 0; gain, integral_gain and ramp_steps >= 0")

    @classmethod
    def from_config(cls, settings, lam):
        """A controller for the `train.adaptive_sparsity` section, starting at λ = `lam` (clamped to the bounds)."""
        keys = ("target_fraction", "lambda_min", "lambda_max", "smoothing", "gain", "integral_gain", "max_step",
                "ramp_steps", "max_error")
        control = cls(**{key: settings[key] for key in keys})
        control.log_lambda = control._clamp(math.log(max(lam, 1e-300)))
        return control

    @property
    def lam(self):
        return math.exp(self.log_lambda)

    def target(self):
        """The activation asked for at the current step: the ramp from its start to `target_fraction`."""
        if self.ramp_start is None or self.ramp_steps == 0 or self.steps >= self.ramp_steps:
            return self.target_fraction
        return self.ramp_start + (self.target_fraction - self.ramp_start) * self.steps / self.ramp_steps

    def _clamp(self, log_lambda):
        return min(max(log_lambda, math.log(self.lambda_min)), math.log(self.lambda_max))

    def update(self, activation):
        """Take the activation measured at this step; return the λ of the next step."""
        if not math.isfinite(activation):
            return self.lam
        if self.smoothed is None:
            self.smoothed = self.ramp_start = float(activation)
        else:
            self.smoothed = self.smoothing * self.smoothed + (1 - self.smoothing) * float(activation)
        self.steps += 1
        error = min(max(self.smoothed - self.target(), -self.max_error), self.max_error)
        delta = self.gain * (error - self.previous_error) + self.integral_gain * error
        self.previous_error = error
        self.log_lambda = self._clamp(self.log_lambda + min(max(delta, -self.max_step), self.max_step))
        return self.lam

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, state):
        for key in ("log_lambda", "smoothed", "previous_error", "ramp_start", "steps"):
            setattr(self, key, state[key])


def lambda_controller(train_config, lam, variant, saved_state=None):
    """The run's controller, or None when `train.adaptive_sparsity` is off or the variant has no λ."""
    settings = train_config["adaptive_sparsity"]
    if not settings["enabled"] or variant not in SPARSITY_VARIANTS:
        return None
    control = LambdaControl.from_config(settings, lam)
    if saved_state is not None:
        control.load_state_dict(saved_state)
    return control
