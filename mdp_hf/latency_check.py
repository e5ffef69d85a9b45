"""Land on the measured budget: time the pruned model and tighten the solver's budget until it fits.

The table model predicts well (a few % at real shapes) but a user's promise is "N ms on this device", so after
the final solve the sliced model is timed against the dense one, interleaved, under the table's own protocol.
If it measures over the budget by more than the tolerance, the solver's budget is lowered by the measured
excess and the problem solved again; once one structure measured over and one within, the next solver budget
is interpolated between the two (secant), so a table that is off by a factor, not a constant, is not
overcorrected far below the budget. A structure that fits but measures more than twice the tolerance under
the budget is loosened the same way. At most ``verify_latency_rounds`` re-solves; the exported structure is
the largest one that measured within the budget.

What "the budget" means when measured:
- ``budget_fraction``: the pruned/dense ratio of the two medians, timed in the same process (robust to the
  machine drifting since the table was built);
- ``budget_ms``: the pruned model's measured milliseconds.

The tolerance is never tighter than the timing's own noise: two standard errors of the measured statistic
(a median's standard error ~ 0.93 x inter-quartile range / sqrt(repeats)); the check records when the noise,
not the model, limits the guarantee. Nothing is verified when this process cannot time the table's device
(a CUDA table on a CPU run, another CPU model, a table filled by a synthetic timer): the check says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .latency.timing import Measurement, TimingSettings, device_name, measure_latencies
from .solver import InfeasibleBudgetError
from .surgery import slice_model

logger = logging.getLogger(__name__)


class LatencyBudgetError(RuntimeError):
    """The pruned model cannot be brought within the budget as measured on the table's device."""

    def __init__(self, message: str, check: LatencyCheck):
        super().__init__(message)
        self.check = check


@dataclass
class MeasuredRound:
    """One solve and its measurement (``measured`` in the budget's unit: fraction of dense, or ms)."""

    solver_budget_ms: float
    predicted_ms: float
    dense_ms: float
    pruned_ms: float
    dense_spread: float
    pruned_spread: float
    measured: float
    noise: float
    measured_over_budget: float


@dataclass
class LatencyCheck:
    """What the verification did: ``status`` "met" (measured <= budget x (1 + tolerance)) or "skipped"."""

    status: str
    budget_unit: str  # "fraction_of_dense" or "ms"
    budget: float
    tolerance: float
    reason: str = ""
    rounds: list[MeasuredRound] = field(default_factory=list)
    chosen: int = -1  # index into rounds of the exported structure (the last round unless a later one overshot)

    @property
    def final(self) -> MeasuredRound | None:
        """The round of the structure that was exported."""
        return self.rounds[self.chosen] if self.rounds else None

    @property
    def noise(self) -> float:
        return self.final.noise if self.rounds else 0.0

    @property
    def effective_tolerance(self) -> float:
        return max(self.tolerance, self.noise)

    @property
    def noise_limited(self) -> bool:
        """True when the timing noise, not the configured tolerance, bounds the guarantee."""
        return self.noise > self.tolerance

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "noise": self.noise,
            "effective_tolerance": self.effective_tolerance,
            "noise_limited": self.noise_limited,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyCheck:
        data = {k: v for k, v in data.items() if k not in ("noise", "effective_tolerance", "noise_limited")}
        return cls(**{**data, "rounds": [MeasuredRound(**r) for r in data.get("rounds", [])]})

    def summary(self) -> str:
        if self.status == "skipped":
            return f"measured latency not verified: {self.reason}"
        last = self.final
        unit = unit_label(self.budget_unit)
        text = (
            f"measured {last.measured:.4g} {unit} for a budget of {self.budget:.4g} {unit} "
            f"(measured/budget {last.measured_over_budget:.3f}, tolerance {100 * self.effective_tolerance:.1f}%) "
            f"after {len(self.rounds) - 1} re-solve(s)"
        )
        if self.noise_limited:
            text += f"; the timing noise ({100 * self.noise:.1f}%) is above the configured tolerance"
        return text


def verification_settings(latency_model) -> TimingSettings | None:
    """The table's own timing protocol (at least 30 repeats), or None when the model carries no table."""
    table = getattr(latency_model, "table", None)
    timing = (getattr(table, "metadata", None) or {}).get("timing")
    if not timing:
        return None
    return TimingSettings(**{**timing, "repeats": max(30, int(timing.get("repeats", 30)))})


def unverifiable_reason(latency_model) -> str | None:
    """Why this process cannot time what ``latency_model`` predicts (None: it can)."""
    table = getattr(latency_model, "table", None)
    metadata = getattr(table, "metadata", None) or {}
    if not metadata.get("timing"):
        return "the latency model has no measured table (no timing protocol to repeat)"
    if metadata.get("timer") == "custom":
        return "the table was filled by a custom timer, not measured on a device"
    device = metadata["timing"].get("device", "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return f"the table was measured on {metadata.get('device_name') or device}; this process has no CUDA device"
    here = device_name(device)
    if metadata.get("device_name") and metadata["device_name"] != here:
        return f"the table was measured on {metadata['device_name']!r}; this process runs on {here!r}"
    return None


def dense_reference(model, space):
    """The dense model the budget refers to, without gates: a fresh instance of a transformers model (latency
    does not depend on weight values), or for a plain module (timm) the dense model in the pruned format."""
    if hasattr(model, "config") and hasattr(model, "from_pretrained"):
        return type(model)(model.config)
    return slice_model(model, space, space.full_choice())


def budget_of(config) -> tuple[str, float]:
    """A PrunableConfig's budget in its own unit: ("ms", budget_ms) or ("fraction_of_dense", budget_fraction)."""
    if config.budget_ms is not None:
        return "ms", float(config.budget_ms)
    return "fraction_of_dense", float(config.budget_fraction)


def unit_label(budget_unit: str) -> str:
    return "of dense" if budget_unit == "fraction_of_dense" else "ms"


def measured_in_unit(budget_unit: str, dense: Measurement, pruned: Measurement) -> tuple[float, float]:
    """The pruned model's measured latency in the budget's unit, and its noise (two relative standard errors;
    combined with the dense model's for a ratio)."""
    if budget_unit == "fraction_of_dense":
        noise = 2 * math.hypot(_relative_standard_error(dense), _relative_standard_error(pruned))
        return pruned.ms / dense.ms, noise
    return pruned.ms, 2 * _relative_standard_error(pruned)


def _relative_standard_error(measurement: Measurement) -> float:
    # a median's standard error ~ 1.2533 sigma / sqrt(n), with sigma ~ IQR / 1.349
    n = max(len(measurement.samples_ms), 1)
    return 0.929 * measurement.spread / math.sqrt(n)


def land_on_budget(
    model,
    space,
    first,
    resolve: Callable[[float], object],
    *,
    budget_unit: str,
    budget: float,
    tolerance: float,
    max_rounds: int,
    dense_predicted_ms: float,
    settings: TimingSettings | None,
    timer: Callable[[list], list[Measurement]] | None = None,
):
    """Measure ``first`` (a PruningStepResult) and re-solve with tighter solver budgets until it fits.

    ``dense_predicted_ms``: the dense model under the solver's latency model (converts a measured excess into the
    table's milliseconds). ``resolve(solver_budget_ms)`` returns a new result for the same scores; it may raise
    InfeasibleBudgetError. ``timer([dense, pruned])`` returns one Measurement per model (default: both timed
    interleaved here with ``settings``; give your own to time on a remote target or your own harness).
    Returns (final result, LatencyCheck); raises LatencyBudgetError when the budget cannot be met as measured
    (the smallest reachable structure measures above it, or the rounds ran out).
    """
    if timer is None:

        def timer(models):
            return measure_latencies(models, settings)

    check = LatencyCheck("met", budget_unit, float(budget), float(tolerance))
    dense = dense_reference(model, space)

    def measure(result) -> MeasuredRound:
        pruned = slice_model(model, space, result.choice)
        dense_m, pruned_m = timer([dense, pruned])
        measured, noise = measured_in_unit(budget_unit, dense_m, pruned_m)
        return MeasuredRound(
            solver_budget_ms=float(getattr(result, "solver_budget_ms", None) or result.budget_ms),
            predicted_ms=float(result.predicted_latency_ms),
            dense_ms=dense_m.ms,
            pruned_ms=pruned_m.ms,
            dense_spread=dense_m.spread,
            pruned_spread=pruned_m.spread,
            measured=measured,
            noise=noise,
            measured_over_budget=measured / budget,
        )

    unit = unit_label(budget_unit)
    # table ms per unit of measured excess: the dense model's prediction per fraction of dense, or per ms
    scale = dense_predicted_ms if budget_unit == "fraction_of_dense" else None
    result = first
    seen: list[tuple[object, MeasuredRound]] = []  # (result, its round), every distinct structure measured
    while True:
        measured = measure(result)
        check.rounds.append(measured)
        seen.append((result, measured))
        logger.info(
            "MDP latency check %d: solver budget %.4g ms, predicted %.4g ms, measured %.4g %s (budget %.4g, "
            "measured/budget %.3f, noise %.1f%%)",
            len(check.rounds),
            measured.solver_budget_ms,
            measured.predicted_ms,
            measured.measured,
            unit,
            budget,
            measured.measured_over_budget,
            100 * measured.noise,
        )
        tolerance_now = max(check.tolerance, measured.noise)
        fits = [(r, m) for r, m in seen if m.measured <= budget * (1 + max(check.tolerance, m.noise))]
        if budget * (1 - 2 * tolerance_now) <= measured.measured <= budget * (1 + tolerance_now):
            return result, check  # landed: within the tolerance on both sides
        if len(check.rounds) > max_rounds:
            if fits:
                return _largest_fitting(check, fits)
            raise LatencyBudgetError(
                f"the pruned model still measures {measured.measured:.4g} {unit} against a budget of {budget:.4g} "
                f"{unit} after {max_rounds} re-solve(s) with tighter solver budgets (tolerance "
                f"{100 * check.effective_tolerance:.1f}%). Raise PrunableConfig.verify_latency_rounds or "
                "latency_tolerance, time on a quieter machine, or set verify_latency=False to trust the table.",
                check,
            )
        next_budget = _next_solver_budget(seen, budget, scale or dense_predicted_ms / measured.dense_ms)
        try:
            candidate = resolve(next_budget)
        except InfeasibleBudgetError as error:
            candidate = resolve(error.min_latency_ms * (1 + 1e-9))  # the table's smallest structure
            if any(_same_choice(candidate.choice, r.choice) for r, _ in seen):
                if fits:
                    return _largest_fitting(check, fits)
                raise _floor_error(check, budget, unit) from error
            floor = measure(candidate)
            check.rounds.append(floor)
            if floor.measured <= budget * (1 + max(check.tolerance, floor.noise)):
                return candidate, check  # the table's smallest structure does fit, as measured
            raise _floor_error(check, budget, unit) from error
        if any(_same_choice(candidate.choice, r.choice) for r, _ in seen):
            # the solver has no structure between those measured: export the largest that fits
            if fits:
                return _largest_fitting(check, fits)
            raise _floor_error(check, budget, unit)
        result = candidate


def _next_solver_budget(seen, budget: float, scale_ms: float) -> float:
    """The solver budget (table ms) to try next. Bracketed (one structure measured over the budget, one within):
    the secant between the closest two, kept strictly inside the bracket. Otherwise: shift the lowest (or
    highest) solver budget by the measured excess or slack, converted to table ms, from its prediction (so the
    choice changes) -- additive, so an error in fixed costs (embeddings, stem) is corrected in one round."""
    points = sorted((min(m.solver_budget_ms, m.predicted_ms), m.measured) for _, m in seen)
    under = [p for p in points if p[1] <= budget]
    over = [p for p in points if p[1] > budget]
    if under and over:
        (s_lo, m_lo), (s_hi, m_hi) = max(under), min(over)
        if s_hi > s_lo and m_hi > m_lo:
            guess = s_lo + (budget - m_lo) * (s_hi - s_lo) / (m_hi - m_lo)
            return min(max(guess, s_lo + 0.05 * (s_hi - s_lo)), s_hi - 0.05 * (s_hi - s_lo))
        return 0.5 * (s_lo + s_hi)
    s_ref, m_ref = points[0] if over else points[-1]
    return max(s_ref - (m_ref - budget) * scale_ms, 1e-9 * scale_ms)


def _largest_fitting(check: LatencyCheck, fits):
    result, chosen = max(fits, key=lambda pair: pair[1].measured)
    check.chosen = check.rounds.index(chosen)
    return result, check


def _same_choice(a, b) -> bool:
    return a.kept == b.kept and sorted(a.removed_blocks) == sorted(b.removed_blocks)


def _floor_error(check: LatencyCheck, budget: float, unit: str) -> LatencyBudgetError:
    floor = check.rounds[-1]
    return LatencyBudgetError(
        f"the budget of {budget:.4g} {unit} cannot be met as measured: the smallest structure this pruning space "
        f"allows measures {floor.measured:.4g} {unit} ({floor.pruned_ms:.4g} ms; the table predicted "
        f"{floor.predicted_ms:.4g} ms). Ask for at least {floor.measured * (1 + check.effective_tolerance):.4g} "
        f"{unit}, allow more to be pruned (prune=, min_keep, blocks), or set verify_latency=False to trust the table.",
        check,
    )
