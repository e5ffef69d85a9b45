"""A latency-constrained pruning problem as plain data (numpy + dataclasses, no torch).

The problem (DESIGN.md §1): every dimension d takes one choice c in 0..K_d-1 (``widths[c]`` units kept);
every removable block b has a keep bit. Maximise the sum of the objective terms of kept blocks (and of
terms outside blocks) subject to the sum of the latency-table cells selected by kept blocks (and by
terms outside blocks) being <= ``budget_ms``. Removing a block drops all its objective and latency terms.

Everything here round-trips through JSON (docs/problem_format.md) so that any solved problem can be
dumped by the trainer and re-solved with ``mdp-hf solve problem.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1

# Solutions are accepted when latency <= budget * (1 + FEASIBILITY_RTOL): float sums taken in a different
# order differ in the last bits; nothing larger is ever tolerated.
FEASIBILITY_RTOL = 1e-9


class ProblemError(ValueError):
    """The problem data is inconsistent (unknown names, wrong table shapes, NaN, ...)."""


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest latency any allowed sub-network reaches.

    ``min_latency_ms`` is that smallest latency; ``breakdown`` lists (what, ms) contributions at the
    minimum, largest first, so the caller can see what binds.
    """

    def __init__(self, message: str, min_latency_ms: float, budget_ms: float, breakdown: list | None = None):
        super().__init__(message)
        self.min_latency_ms = float(min_latency_ms)
        self.budget_ms = float(budget_ms)
        self.breakdown = list(breakdown or [])


class NoSolutionWithinTimeLimit(RuntimeError):
    """No feasible sub-network was found within the time limit (the budget may still be feasible)."""


@dataclass
class Dimension:
    """A prunable dimension. ``widths[c]`` = units kept at choice c (strictly increasing, never zero)."""

    name: str
    widths: list[int]


@dataclass
class Block:
    """A residual branch with a keep bit; ``removable=False`` fixes the bit to 1 (e.g. stem + shortcuts)."""

    name: str
    removable: bool = True


@dataclass
class ObjectiveTerm:
    """Importance ``values[c]`` of dimension ``dim`` at choice c, counted only while ``block`` is kept."""

    dim: str
    values: list[float]
    block: str | None = None


@dataclass
class LatencyTerm:
    """Measured latency (ms) over 0..3 dimensions; ``table[c1, c2, ...]``; counted only while ``block`` is kept."""

    name: str
    dims: list[str]
    table: np.ndarray
    block: str | None = None

    def __post_init__(self):
        self.table = np.asarray(self.table, dtype=np.float64)


@dataclass
class Problem:
    dimensions: list[Dimension]
    blocks: list[Block]
    objective_terms: list[ObjectiveTerm]
    latency_terms: list[LatencyTerm]
    budget_ms: float
    fixed_choices: dict[str, int] = field(default_factory=dict)
    fixed_blocks: dict[str, bool] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ lookups
    @property
    def dim_index(self) -> dict[str, int]:
        return {d.name: i for i, d in enumerate(self.dimensions)}

    @property
    def block_index(self) -> dict[str, int]:
        return {b.name: i for i, b in enumerate(self.blocks)}

    def num_choices(self, dim: str) -> int:
        return len(self.dimensions[self.dim_index[dim]].widths)

    def allowed_choices(self, dim: str) -> list[int]:
        """Choice indices a solver may use for ``dim`` (one if the choice is fixed)."""
        if dim in self.fixed_choices:
            return [int(self.fixed_choices[dim])]
        return list(range(self.num_choices(dim)))

    def block_state(self, block: str) -> str:
        """'kept' (never removed or fixed kept), 'removed' (fixed removed) or 'free' (the solver decides)."""
        b = self.blocks[self.block_index[block]]
        if not b.removable:
            return "kept"
        if block in self.fixed_blocks:
            return "kept" if self.fixed_blocks[block] else "removed"
        return "free"

    # ------------------------------------------------------------------ checks
    def validate(self) -> Problem:
        """Raise ProblemError naming the first inconsistency and how to fix it; return self when valid."""
        dims = {}
        for d in self.dimensions:
            if d.name in dims:
                raise ProblemError(f"dimension {d.name!r} is defined twice; dimension names must be unique")
            w = list(d.widths)
            if not w:
                raise ProblemError(f"dimension {d.name!r} has no widths; give at least one kept width")
            if any(int(x) != x or x <= 0 for x in w):
                raise ProblemError(
                    f"dimension {d.name!r}: widths must be positive integers (zero is never a width: "
                    f"remove the block instead), got {w}"
                )
            if any(b <= a for a, b in zip(w, w[1:])):
                raise ProblemError(f"dimension {d.name!r}: widths must be strictly increasing, got {w}")
            dims[d.name] = len(w)
        blocks = {}
        for b in self.blocks:
            if b.name in blocks:
                raise ProblemError(f"block {b.name!r} is defined twice; block names must be unique")
            blocks[b.name] = b

        def check_block(where: str, block):
            if block is not None and block not in blocks:
                raise ProblemError(
                    f"{where} refers to unknown block {block!r}; known blocks: {sorted(blocks)[:10]}"
                    f"{'...' if len(blocks) > 10 else ''} (use null for terms outside blocks)"
                )

        def check_dim(where: str, dim):
            if dim not in dims:
                raise ProblemError(
                    f"{where} refers to unknown dimension {dim!r}; known: {sorted(dims)[:10]}"
                    f"{'...' if len(dims) > 10 else ''}"
                )

        for i, term in enumerate(self.objective_terms):
            where = f"objective term #{i} (dim {term.dim!r}, block {term.block!r})"
            check_dim(where, term.dim)
            check_block(where, term.block)
            values = np.asarray(term.values, dtype=np.float64)
            if values.shape != (dims[term.dim],):
                raise ProblemError(
                    f"{where}: has {values.size} values but dimension {term.dim!r} has "
                    f"{dims[term.dim]} choices; give one importance value per choice"
                )
            if not np.all(np.isfinite(values)):
                raise ProblemError(f"{where}: values contain NaN or infinity")
        names = set()
        for term in self.latency_terms:
            where = f"latency term {term.name!r}"
            if term.name in names:
                raise ProblemError(f"{where} is defined twice; latency term names must be unique")
            names.add(term.name)
            check_block(where, term.block)
            if len(term.dims) > 3:
                raise ProblemError(
                    f"{where}: tables over more than 3 dimensions are not supported (got {term.dims}); split the term"
                )
            if len(set(term.dims)) != len(term.dims):
                raise ProblemError(f"{where}: a dimension appears twice in {term.dims}")
            for dim in term.dims:
                check_dim(where, dim)
            expected = tuple(dims[d] for d in term.dims)
            table = np.asarray(term.table, dtype=np.float64)
            if table.shape != expected:
                raise ProblemError(
                    f"{where}: table shape {table.shape} does not match the choices of its dims "
                    f"{term.dims} -> expected {expected}"
                )
            if not np.all(np.isfinite(table)):
                raise ProblemError(f"{where}: table contains NaN or infinity (unmeasured cells?)")
            # Negative cells are allowed: a decomposed table (e.g. attention = T_qk + T_vo + an interaction
            # correction) has terms that only make sense summed. The backends are exact for any sign.
        if not math.isfinite(float(self.budget_ms)):
            raise ProblemError(f"budget_ms must be finite, got {self.budget_ms}")
        for dim, c in self.fixed_choices.items():
            check_dim("fixed_choices", dim)
            if not (0 <= int(c) < dims[dim]) or int(c) != c:
                raise ProblemError(f"fixed_choices[{dim!r}] = {c} is not a choice index in 0..{dims[dim] - 1}")
        for block, keep in self.fixed_blocks.items():
            check_block("fixed_blocks", block)
            if not keep and not blocks[block].removable:
                raise ProblemError(f"fixed_blocks[{block!r}] = false but block {block!r} is not removable")
        return self

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, choices: dict[str, int], blocks: dict[str, bool] | None = None) -> tuple[float, float]:
        """(objective, latency_ms) of an assignment; blocks missing from ``blocks`` count as kept."""
        blocks = blocks or {}

        def kept(block):
            return block is None or bool(blocks.get(block, True))

        objective = 0.0
        for term in self.objective_terms:
            if kept(term.block):
                objective += float(term.values[int(choices[term.dim])])
        latency = 0.0
        for term in self.latency_terms:
            if kept(term.block):
                latency += float(term.table[tuple(int(choices[d]) for d in term.dims)])
        return objective, latency

    def dense_choices(self) -> tuple[dict[str, int], dict[str, bool]]:
        """All largest widths (respecting fixed choices), every block kept (respecting fixed blocks)."""
        choices = {d.name: int(self.fixed_choices.get(d.name, len(d.widths) - 1)) for d in self.dimensions}
        blocks = {b.name: self.block_state(b.name) != "removed" for b in self.blocks}
        return choices, blocks

    def dense_latency(self) -> float:
        return self.evaluate(*self.dense_choices())[1]

    def is_dense_optimal_when_feasible(self) -> bool:
        """True when more width and more blocks never lose objective (nondecreasing, nonnegative importances),
        so that a budget >= dense latency makes the dense choice optimal."""
        for term in self.objective_terms:
            values = np.asarray(term.values, dtype=np.float64)
            if np.any(np.diff(values) < 0) or (term.block is not None and values[0] < 0):
                return False
        return True

    def within_budget(self, latency_ms: float) -> bool:
        return latency_ms <= self.budget_ms + FEASIBILITY_RTOL * max(1.0, abs(self.budget_ms))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "budget_ms": float(self.budget_ms),
            "dimensions": [{"name": d.name, "widths": [int(w) for w in d.widths]} for d in self.dimensions],
            "blocks": [{"name": b.name, "removable": bool(b.removable)} for b in self.blocks],
            "objective_terms": [
                {"dim": t.dim, "block": t.block, "values": [float(v) for v in t.values]} for t in self.objective_terms
            ],
            "latency_terms": [
                {
                    "name": t.name,
                    "dims": list(t.dims),
                    "block": t.block,
                    "table": np.asarray(t.table, dtype=np.float64).tolist(),
                }
                for t in self.latency_terms
            ],
            "fixed_choices": {k: int(v) for k, v in self.fixed_choices.items()},
            "fixed_blocks": {k: bool(v) for k, v in self.fixed_blocks.items()},
            "metadata": self.metadata,
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise (docs/problem_format.md); write to ``path`` when given. Returns the JSON text."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False, default=_json_default)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Problem:
        """Build and validate a problem from its JSON object. Every field is type-checked as read: a width or
        fixed choice that is not an integer, a keep bit that is not a boolean, a budget that is not a number or
        a ragged table is a ProblemError naming the entry (nothing is truncated or coerced silently)."""
        if not isinstance(data, dict):
            raise ProblemError(f"a problem is a JSON object (see docs/problem_format.md), got a {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ProblemError(
                f"unsupported problem format_version {version!r}; this mdp_hf reads version "
                f"{FORMAT_VERSION} (see docs/problem_format.md)"
            )
        try:
            dimensions = [
                Dimension(
                    _str(d["name"], f"dimensions[{i}].name"),
                    [
                        _int(w, f"dimensions[{i}] ({d['name']!r}).widths[{k}]")
                        for k, w in enumerate(_list(d["widths"], f"dimensions[{i}].widths"))
                    ],
                )
                for i, d in enumerate(_list(data["dimensions"], "dimensions", of=dict))
            ]
            blocks = [
                Block(
                    _str(b["name"], f"blocks[{i}].name"),
                    _bool(b.get("removable", True), f"blocks[{i}] ({b['name']!r}).removable"),
                )
                for i, b in enumerate(_list(data.get("blocks", []), "blocks", of=dict))
            ]
            objective_terms = [
                ObjectiveTerm(
                    _str(t["dim"], f"objective_terms[{i}].dim"),
                    [
                        _float(v, f"objective_terms[{i}].values[{k}]")
                        for k, v in enumerate(_list(t["values"], f"objective_terms[{i}].values"))
                    ],
                    _optional_str(t.get("block"), f"objective_terms[{i}].block"),
                )
                for i, t in enumerate(_list(data.get("objective_terms", []), "objective_terms", of=dict))
            ]
            latency_terms = [
                LatencyTerm(
                    _str(t["name"], f"latency_terms[{i}].name"),
                    [
                        _str(d, f"latency_terms[{i}] ({t['name']!r}).dims[{k}]")
                        for k, d in enumerate(_list(t["dims"], f"latency_terms[{i}].dims"))
                    ],
                    _table(t["table"], f"latency_terms[{i}] ({t['name']!r}).table"),
                    _optional_str(t.get("block"), f"latency_terms[{i}] ({t['name']!r}).block"),
                )
                for i, t in enumerate(_list(data.get("latency_terms", []), "latency_terms", of=dict))
            ]
            problem = cls(
                dimensions=dimensions,
                blocks=blocks,
                objective_terms=objective_terms,
                latency_terms=latency_terms,
                budget_ms=_float(data["budget_ms"], "budget_ms"),
                fixed_choices={
                    k: _int(v, f"fixed_choices[{k!r}]")
                    for k, v in _dict(data.get("fixed_choices", {}), "fixed_choices").items()
                },
                fixed_blocks={
                    k: _bool(v, f"fixed_blocks[{k!r}]")
                    for k, v in _dict(data.get("fixed_blocks", {}), "fixed_blocks").items()
                },
                metadata=_dict(data.get("metadata", {}), "metadata"),
            )
        except KeyError as e:
            raise ProblemError(
                f"problem JSON is missing the required field {e.args[0]!r} (see docs/problem_format.md)"
            ) from None
        return problem.validate()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Problem:
        """Load from a file (whatever its name looks like, e.g. ``{run}.json``). Errors name the file:
        FileNotFoundError / IsADirectoryError, ProblemError for invalid JSON or an invalid problem."""
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProblemError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except ProblemError as e:
            raise ProblemError(f"{path}: {e}") from None

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> Problem:
        """Load from a file path or from JSON text. A path object, or a string naming an existing file, is
        always read as a file (also when its name begins with ``{``); any other string beginning with ``{``
        is JSON text."""
        if isinstance(path_or_text, os.PathLike) or os.path.exists(str(path_or_text)):
            return cls.from_file(path_or_text)
        text = str(path_or_text)
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ProblemError(
                    f"the problem text is not valid JSON ({e}) and no file of that name exists"
                ) from None
            return cls.from_dict(data)
        return cls.from_file(path_or_text)


def _type_error(where: str, expected: str, value) -> ProblemError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return ProblemError(f"{where} must be {expected}, got {shown} ({type(value).__name__}); see docs/problem_format.md")


def _int(value, where: str) -> int:
    """A JSON integer (an integral float such as 16.0 is accepted); never truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(where, "an integer", value)
    if isinstance(value, float) and not (math.isfinite(value) and value == int(value)):
        raise _type_error(where, "an integer (it would be truncated)", value)
    return int(value)


def _float(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(where, "a number", value)
    return float(value)


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(where, "true or false", value)
    return value


def _str(value, where: str) -> str:
    if not isinstance(value, str):
        raise _type_error(where, "a string", value)
    return value


def _optional_str(value, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _list(value, where: str, of: type | None = None) -> list:
    if not isinstance(value, list):
        raise _type_error(where, "a list", value)
    if of is not None:
        for i, item in enumerate(value):
            if not isinstance(item, of):
                raise _type_error(f"{where}[{i}]", "a JSON object" if of is dict else of.__name__, item)
    return value


def _dict(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _type_error(where, "a JSON object", value)
    return dict(value)


def _table(value, where: str) -> np.ndarray:
    """Nested lists of numbers (or one number) as a float array; ragged or non-numeric tables are refused."""

    def numbers_only(item):
        if isinstance(item, list):
            return all(numbers_only(v) for v in item)
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if not numbers_only(value):
        raise ProblemError(f"{where} must hold numbers only (nested lists of ms values); see docs/problem_format.md")
    try:
        return np.asarray(value, dtype=np.float64)
    except ValueError:
        raise ProblemError(f"{where} is ragged: every row of a table must have the same length") from None


def _json_default(value):
    """numpy scalars/arrays in metadata become plain JSON numbers/lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON serialisable")


@dataclass
class Solution:
    """A solved problem with its certificate. ``gap`` is relative: (bound - objective) / max(|bound|, 1e-12)."""

    choices: dict[str, int]
    widths: dict[str, int]
    blocks: dict[str, bool]
    objective: float
    latency_ms: float
    bound: float
    gap: float
    status: str  # "optimal" | "time_limit" | "feasible"
    backend: str
    solve_time_s: float
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"status={self.status} objective={self.objective:.6f} latency_ms={self.latency_ms:.6f} "
            f"bound={self.bound:.6f} gap={self.gap:.3g} time_s={self.solve_time_s:.3f} backend={self.backend}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "choices",
                "widths",
                "blocks",
                "objective",
                "latency_ms",
                "bound",
                "gap",
                "status",
                "backend",
                "solve_time_s",
                "info",
            )
        }


def relative_gap(objective: float, bound: float) -> float:
    if not math.isfinite(bound):
        return math.inf  # no finite bound is known
    return max(0.0, (bound - objective) / max(abs(bound), 1e-12))


def make_solution(
    problem: Problem,
    choices: dict[str, int],
    blocks: dict[str, bool],
    *,
    bound: float,
    status: str,
    backend: str,
    solve_time_s: float,
    info: dict | None = None,
) -> Solution:
    """Build a Solution whose objective and latency are re-evaluated exactly from the problem."""
    choices = {d.name: int(choices[d.name]) for d in problem.dimensions}
    blocks = {b.name: bool(blocks.get(b.name, True)) for b in problem.blocks}
    objective, latency = problem.evaluate(choices, blocks)
    bound = max(float(bound), objective)
    gap = relative_gap(objective, bound)
    if status == "optimal":
        gap = 0.0 if gap <= 1e-9 else gap
    widths = {d.name: int(d.widths[choices[d.name]]) for d in problem.dimensions}
    return Solution(
        choices, widths, blocks, objective, latency, bound, gap, status, backend, solve_time_s, dict(info or {})
    )
