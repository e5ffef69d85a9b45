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
- ``budget_fraction``: the median of the per-round pruned/dense ratios, both models timed interleaved in the
  same process (robust to the machine drifting since the table was built, and to drift within the timing:
  both calls of a round see the same machine);
- ``budget_ms``: the pruned model's measured milliseconds.

"Within the budget" is decided on the measurement's upper confidence bound, measured x (1 + noise) <=
budget x (1 + tolerance), where the noise is two relative standard errors of the statistic (a median's
standard error ~ 0.93 x inter-quartile range / sqrt(repeats)). Timing a structure repeats the protocol until
the noise is under half the tolerance or ``verify_latency_max_seconds`` have passed, so a noisy machine costs
timing first and, when that is spent, headroom under the budget -- never a model over it. The check records
when the noise, not the tolerance, set that headroom. Nothing is verified when this process cannot time the
table's device (a CUDA table on a CPU run, another CPU model, a table filled by a synthetic timer): the check
says so.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .latency.timing import Measurement, TimingSettings, device_name, measure_latencies
from .solver import InfeasibleBudgetError
from .surgery import slice_model

logger = logging.getLogger(__name__)

MAX_TIMING_CALLS = 20  # repetitions of the table's protocol for one structure at most


class LatencyBudgetError(RuntimeError):
    """The pruned model cannot be brought within the budget as measured on the table's device."""

    def __init__(self, message: str, check: LatencyCheck):
        super().__init__(message)
        self.check = check


@dataclass
class LatencyReading:
    """One structure timed against the dense model: both measurements (all their samples), the pruned model in
    the budget's unit (fraction of dense, or ms) and its noise (two relative standard errors)."""

    dense: Measurement
    pruned: Measurement
    measured: float
    noise: float


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
    repeats: int = 0  # timed calls of each model behind ``measured`` (0: written before this was recorded)

    @property
    def upper_bound(self) -> float:
        """``measured`` at two standard errors of the timing: what the check holds against the budget."""
        return self.measured * (1 + self.noise)

    @property
    def upper_over_budget(self) -> float:
        """measured/budget at two standard errors of the timing."""
        return self.measured_over_budget * (1 + self.noise)


@dataclass
class LatencyCheck:
    """What the verification did: ``status`` "met" (measured x (1 + noise) <= budget x (1 + tolerance)) or
    "skipped"."""

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
    def upper_over_budget(self) -> float | None:
        """The exported structure's measured/budget at two standard errors (<= 1 + tolerance when met)."""
        return self.final.upper_over_budget if self.rounds else None

    @property
    def noise_limited(self) -> bool:
        """True when the timing noise, not the configured tolerance, set how far under the budget the model had
        to measure (the noise stayed above the tolerance after the timing time was spent)."""
        return self.noise > self.tolerance

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "noise": self.noise,
            "upper_over_budget": self.upper_over_budget,
            "noise_limited": self.noise_limited,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyCheck:
        derived = ("noise", "upper_over_budget", "noise_limited", "effective_tolerance")
        data = {k: v for k, v in data.items() if k not in derived}
        return cls(**{**data, "rounds": [MeasuredRound(**r) for r in data.get("rounds", [])]})

    def summary(self) -> str:
        if self.status == "skipped":
            return f"measured latency not verified: {self.reason}"
        last = self.final
        unit = unit_label(self.budget_unit)
        text = (
            f"measured {last.measured:.4g} {unit} for a budget of {self.budget:.4g} {unit} "
            f"(measured/budget {last.measured_over_budget:.3f}, {last.upper_over_budget:.3f} at two standard "
            f"errors; tolerance {100 * self.tolerance:.1f}%) after {len(self.rounds) - 1} re-solve(s)"
        )
        if self.noise_limited:
            text += (
                f"; the timing noise ({100 * self.noise:.1f}%) is above the tolerance, so the model was kept that far "
                "under the budget"
            )
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
    """The pruned model's measured latency in the budget's unit, and its noise (two relative standard errors).

    A fraction of dense is the median of the per-round ratios when the two were timed interleaved (equal sample
    counts, round r of each side by side): drift that slows both calls of a round cancels. Otherwise (a timer
    that returns unpaired samples, or the ``min`` statistic) it is the ratio of the two statistics, with the
    two standard errors combined."""
    if budget_unit != "fraction_of_dense":
        return pruned.ms, 2 * _relative_standard_error(pruned)
    paired = len(dense.samples_ms) == len(pruned.samples_ms) >= 4 and pruned.ms == pruned.median_ms
    if paired and all(d > 0 for d in dense.samples_ms):
        ratios = Measurement.from_samples([p / d for d, p in zip(dense.samples_ms, pruned.samples_ms)])
        return ratios.median_ms, 2 * _relative_standard_error(ratios)
    return pruned.ms / dense.ms, 2 * math.hypot(_relative_standard_error(dense), _relative_standard_error(pruned))


def _relative_standard_error(measurement: Measurement) -> float:
    # a median's standard error ~ 1.2533 sigma / sqrt(n), with sigma ~ IQR / 1.349
    return 0.929 * measurement.spread / math.sqrt(max(len(measurement.samples_ms), 1))


def read_against_dense(
    dense,
    pruned,
    budget_unit: str,
    timer: Callable[[list], list[Measurement]],
    *,
    target_noise: float,
    max_seconds: float,
    statistic: str = "median",
    max_calls: int = MAX_TIMING_CALLS,
) -> LatencyReading:
    """Time ``pruned`` against ``dense`` with ``timer([dense, pruned])``, repeating it (all samples pooled) until
    the noise is at most ``target_noise``, ``max_seconds`` have passed or ``max_calls`` timings were made. The
    latency check, the export's report and benchmarks/budget_hit.py's fresh-process re-timing all read a
    structure's latency this way."""
    start = time.perf_counter()
    pooled: tuple[list[float], list[float]] = ([], [])  # every sample so far, dense and pruned
    for call in range(1, max_calls + 1):
        for samples, measurement in zip(pooled, timer([dense, pruned])):
            samples.extend(measurement.samples_ms or [measurement.ms])
        dense_all, pruned_all = (Measurement.from_samples(samples, statistic) for samples in pooled)
        measured, noise = measured_in_unit(budget_unit, dense_all, pruned_all)
        if noise <= target_noise or call == max_calls or time.perf_counter() - start >= max_seconds:
            return LatencyReading(dense_all, pruned_all, measured, noise)


def table_timer(settings: TimingSettings | None):
    """``timer([dense, pruned])`` under the table's protocol, here (interleaved, ``settings``' device/threads)."""

    def timer(models):
        return measure_latencies(models, settings)

    return timer


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
    max_seconds: float = 30.0,
):
    """Measure ``first`` (a PruningStepResult) and re-solve with tighter solver budgets until it fits.

    ``dense_predicted_ms``: the dense model under the solver's latency model (converts a measured excess into the
    table's milliseconds). ``resolve(solver_budget_ms)`` returns a new result for the same scores; it may raise
    InfeasibleBudgetError. ``timer([dense, pruned])`` returns one Measurement per model (default: both timed
    interleaved here with ``settings``; give your own to time on a remote target or your own harness); each
    structure is timed repeatedly for up to ``max_seconds`` (``read_against_dense``).
    Returns (final result, LatencyCheck); raises LatencyBudgetError when the budget cannot be met as measured
    (the smallest reachable structure measures above it, or the rounds ran out).
    """
    timer = timer or table_timer(settings)
    statistic = settings.statistic if settings is not None else "median"
    check = LatencyCheck("met", budget_unit, float(budget), float(tolerance))
    dense = dense_reference(model, space)
    ceiling = budget * (1 + tolerance)  # what a structure's upper confidence bound must not exceed

    def measure(result) -> MeasuredRound:
        pruned = slice_model(model, space, result.choice)
        reading = read_against_dense(
            dense, pruned, budget_unit, timer, target_noise=tolerance / 2, max_seconds=max_seconds, statistic=statistic
        )
        return MeasuredRound(
            solver_budget_ms=float(getattr(result, "solver_budget_ms", None) or result.budget_ms),
            predicted_ms=float(result.predicted_latency_ms),
            dense_ms=reading.dense.ms,
            pruned_ms=reading.pruned.ms,
            dense_spread=reading.dense.spread,
            pruned_spread=reading.pruned.spread,
            measured=reading.measured,
            noise=reading.noise,
            measured_over_budget=reading.measured / budget,
            repeats=len(reading.pruned.samples_ms),
        )

    def fits(round_: MeasuredRound) -> bool:
        return round_.upper_bound <= ceiling

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
            "measured/budget %.3f, noise %.1f%% after %d repeats)",
            len(check.rounds),
            measured.solver_budget_ms,
            measured.predicted_ms,
            measured.measured,
            unit,
            budget,
            measured.measured_over_budget,
            100 * measured.noise,
            measured.repeats,
        )
        fitting = [(r, m) for r, m in seen if fits(m)]
        if fits(measured) and measured.upper_bound >= budget * (1 - 2 * tolerance):
            return result, check  # landed: the upper bound within the tolerance band under the ceiling
        if len(check.rounds) > max_rounds:
            if fitting:
                return _largest_fitting(check, fitting)
            raise LatencyBudgetError(
                f"the pruned model still measures {measured.measured:.4g} {unit} (noise {100 * measured.noise:.1f}%) "
                f"against a budget of {budget:.4g} {unit} after {max_rounds} re-solve(s) with tighter solver "
                f"budgets (tolerance {100 * tolerance:.1f}%). Raise PrunableConfig.verify_latency_rounds or "
                "latency_tolerance, time on a quieter machine, or set verify_latency=False to trust the table.",
                check,
            )
        target = budget * (1 - tolerance / 2)  # the middle of the band the upper bound should land in
        next_budget = _next_solver_budget(seen, ceiling, target, scale or dense_predicted_ms / measured.dense_ms)
        try:
            candidate = resolve(next_budget)
        except InfeasibleBudgetError as error:
            candidate = resolve(error.min_latency_ms * (1 + 1e-9))  # the table's smallest structure
            floor = _round_of(seen, candidate)
            if floor is not None:
                if fitting:
                    return _largest_fitting(check, fitting)
                raise _floor_error(check, budget, unit, dense_predicted_ms, floor) from error
            floor = measure(candidate)
            check.rounds.append(floor)
            if fits(floor):
                return candidate, check  # the table's smallest structure does fit, as measured
            raise _floor_error(check, budget, unit, dense_predicted_ms, floor) from error
        if _round_of(seen, candidate) is not None:
            # the solver has no structure between those measured: export the largest that fits
            if fitting:
                return _largest_fitting(check, fitting)
            raise _floor_error(check, budget, unit, dense_predicted_ms, None)
        result = candidate


def _next_solver_budget(seen, ceiling: float, target: float, scale_ms: float) -> float:
    """The solver budget (table ms) to try next, steering each structure's upper confidence bound (measured x
    (1 + noise)) to ``target``. Bracketed (one structure's bound over ``ceiling``, one within): the secant
    between the closest two, kept strictly inside the bracket. Otherwise: shift the lowest (or highest) solver
    budget by the bound's excess or slack over the target, converted to table ms, from its prediction (so the
    choice changes) -- additive, so an error in fixed costs (embeddings, stem) is corrected in one round."""
    points = sorted((min(m.solver_budget_ms, m.predicted_ms), m.upper_bound) for _, m in seen)
    under = [p for p in points if p[1] <= ceiling]
    over = [p for p in points if p[1] > ceiling]
    if under and over:
        (s_lo, m_lo), (s_hi, m_hi) = max(under), min(over)
        if s_hi > s_lo and m_hi > m_lo:
            guess = s_lo + (target - m_lo) * (s_hi - s_lo) / (m_hi - m_lo)
            return min(max(guess, s_lo + 0.05 * (s_hi - s_lo)), s_hi - 0.05 * (s_hi - s_lo))
        return 0.5 * (s_lo + s_hi)
    s_ref, m_ref = points[0] if over else points[-1]
    return max(s_ref - (m_ref - target) * scale_ms, 1e-9 * scale_ms)


def _largest_fitting(check: LatencyCheck, fits):
    result, chosen = max(fits, key=lambda pair: pair[1].measured)
    check.chosen = check.rounds.index(chosen)
    return result, check


def _same_choice(a, b) -> bool:
    return a.kept == b.kept and sorted(a.removed_blocks) == sorted(b.removed_blocks)


def _round_of(seen, result) -> MeasuredRound | None:
    """The round that measured ``result``'s structure, if one did."""
    return next((m for r, m in seen if _same_choice(result.choice, r.choice)), None)


# a table this far from the measured fraction of dense at its own fastest structure was not timed on this machine
# as it is now (on CI, built beside other tests' load, it predicted -0.16 ms for a structure measuring 0.66 of
# dense); on an idle machine the same table predicted 0.21 of dense for its smallest structure, measured 0.17
TABLE_FAR_OFF = 0.2


def _floor_error(
    check: LatencyCheck, budget: float, unit: str, dense_predicted_ms: float, table_fastest: MeasuredRound | None
) -> LatencyBudgetError:
    """The budget is out of reach as measured. ``table_fastest``: the round of the structure the table predicts
    fastest (None: the solver found no new structure for tighter budgets). Either way the claim is what was
    measured; when the table is far off, its "fastest" may not be, and the message says to rebuild it."""
    floor = table_fastest or min(check.rounds, key=lambda r: r.measured)
    least = min(r.upper_bound for r in check.rounds) / (1 + check.tolerance)  # what one measured structure meets
    what = (
        "the structure the latency table predicts to be the fastest this pruning space allows"
        if table_fastest is not None
        else "the solver finds no new structure for tighter budgets, and the fastest it found"
    )
    predicted_fraction = floor.predicted_ms / dense_predicted_ms
    measured_fraction = floor.pruned_ms / floor.dense_ms
    far_off = ""
    if floor.predicted_ms <= 0 or measured_fraction - predicted_fraction > TABLE_FAR_OFF:
        far_off = (
            f" The table is far from this machine's timing there: it predicted {floor.predicted_ms:.4g} ms "
            f"({predicted_fraction:.3g} of its dense model) for a structure measuring {measured_fraction:.3g} of "
            "dense, so it was probably built while the machine was busy and its fastest structure need not be the "
            "fastest. Rebuild the latency table on an idle machine (nothing else running) before lowering the budget."
        )
    return LatencyBudgetError(
        f"the budget of {budget:.4g} {unit} cannot be met as measured: {what} measures {floor.measured:.4g} {unit} "
        f"({floor.pruned_ms:.4g} ms, noise {100 * floor.noise:.1f}%; the table predicted {floor.predicted_ms:.4g} "
        f"ms). Ask for at least {least:.4g} {unit}, allow more to be pruned (prune=, min_keep, blocks), or set "
        f"verify_latency=False to trust the table.{far_off}",
        check,
    )
