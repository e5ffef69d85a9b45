"""Latency models with one interface: ``model.predict(structure) -> ms``.

``structure`` may be
- a model of a registered family: a sliced (pruned-format) model, or the dense model it came from (widths
  are read from the model's own pruning space; a block missing from it counts as removed);
- a transformers config of such a model (pruned or dense): a skeleton is built on the meta device, nothing
  is allocated;
- a ``(space, choice)`` pair (``PruningSpace``, ``PruningChoice``), as the trainer holds them;
- a :class:`Structure` (``widths`` per dimension name, ``removed_blocks``).

Models (all built from a :class:`~mdp_hf.latency.table.LatencyTable`):
- :class:`TableLatencyModel` (default): the sum of measured multi-dimensional cells of the kept terms.
- :class:`LinearLatencyModel`: HALP-style ablation: marginal cost along each layer's output channels with
  the input width frozen at its current value, re-linearised at every pruning step, no interactions.
- :class:`FlopsLatencyModel`: FLOPs (or parameter) proxy scaled to the dense latency.

``solver_terms(space)`` returns the terms in the solver's plain-numpy shape (:class:`LatencyTermSpec`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .table import LatencyTable, LatencyTableError, interpolate_grid, space_fingerprint, space_summary


@dataclass
class LatencyTermSpec:
    """One additive latency term for the solver (plain numpy, no torch).

    ``table[c1, c2, ...]`` is the latency in ms when dimension ``dims[k]`` takes choice index ``ck``
    (an index into ``space.dimensions[dims[k]].widths()``); shape ``tuple(len(widths) for each dim)``;
    0 dims = a constant. The term is paid only while ``block`` is kept (None: always paid). Field names
    match ``mdp_hf.solver.problem.LatencyTerm``: ``LatencyTerm(**dataclasses.asdict(spec))`` converts.
    """

    name: str
    dims: list[str]
    table: np.ndarray
    block: str | None = None


@dataclass
class Structure:
    """Widths (unit counts) per dimension name and the set of removed blocks."""

    widths: dict[str, int]
    removed_blocks: set[str] = field(default_factory=set)


def _space_of(obj):
    from ..adapters import build_space

    return build_space(obj)


def as_structure(structure, blocks: dict | None = None) -> Structure:
    """Normalise any accepted ``structure`` (see module doc) to a :class:`Structure`.

    ``blocks``: the removable blocks of the space the latency model was built for; a block of that
    space that does not exist in a model's own space is reported as removed.
    """
    if isinstance(structure, Structure):
        return structure
    if isinstance(structure, tuple) and len(structure) == 2:
        space, choice = structure
        if hasattr(choice, "kept_indices"):
            choice.validate(space)
            widths = {name: len(choice.kept_indices(space, name)) for name in space.dimensions}
            return Structure(widths, set(choice.removed_blocks))
    if hasattr(structure, "model_type") and not hasattr(structure, "forward"):  # a config: a skeleton on meta
        import torch
        from transformers import AutoModel

        with torch.device("meta"):
            structure = AutoModel.from_config(structure)  # the base model is enough to read widths
    if hasattr(structure, "forward"):
        own = _space_of(structure)
        widths = {name: d.size for name, d in own.dimensions.items()}
        removed = {b for b in (blocks or {}) if b not in own.blocks}
        return Structure(widths, removed)
    raise TypeError(
        "structure must be a sliced/dense model, its config, a (PruningSpace, PruningChoice) pair or a "
        f"mdp_hf.latency.Structure; got {type(structure).__name__}"
    )


def _lookup(grid: np.ndarray, axes: list[list[int]], widths: list[int], term_name: str) -> float:
    index = []
    for axis, w in zip(axes, widths):
        if w < axis[0] or w > axis[-1]:
            raise LatencyTableError(
                f"term {term_name!r}: width {w} is outside the table's range [{axis[0]}, {axis[-1]}]; build the "
                "table with smaller group sizes / min_keep to cover it"
            )
        try:
            index.append(axis.index(w))
        except ValueError:
            index = None
            break
    if index is not None:
        return float(grid[tuple(index)])
    return float(interpolate_grid(axes, grid, [[w] for w in widths]).reshape(-1)[0])


def dense_latency_ms(terms) -> float:
    """Sum of every term at its last (dense) cell: the latency the terms predict for the unpruned model."""
    return float(sum(float(np.asarray(t.table)[(-1,) * len(t.dims)]) for t in terms))


class LatencyModel:
    """Base: a list of additive terms over the table's space; ``predict`` sums the kept ones."""

    name = "latency model"

    def __init__(self, table: LatencyTable, space=None, allow_mismatch: bool = False):
        table.validate(allow_mismatch=allow_mismatch)  # also tables built or edited in memory
        self.table = table
        self.space_dims = table.space["dimensions"]
        self.blocks = table.space["blocks"]
        if space is not None:
            summary = space_summary(space)
            if space_fingerprint(summary) != table.metadata.get("space_fingerprint", space_fingerprint(table.space)):
                table.check({"space_fingerprint": space_fingerprint(summary)}, allow_mismatch, summary)
        self._terms: list[LatencyTermSpec] | None = None

    # subclasses fill this: terms on the table's own grids
    def _build_terms(self) -> list[LatencyTermSpec]:
        raise NotImplementedError

    @property
    def terms(self) -> list[LatencyTermSpec]:
        if self._terms is None:
            self._terms = self._build_terms()
        return self._terms

    def breakdown(self, structure) -> list[tuple[str, float]]:
        """(term name, ms) of every term that is paid for ``structure``."""
        s = as_structure(structure, self.blocks)
        out = []
        for term in self.terms:
            if term.block is not None and term.block in s.removed_blocks:
                continue
            missing = [d for d in term.dims if d not in s.widths]
            if missing:
                raise LatencyTableError(
                    f"structure has no width for {missing} (needed by term {term.name!r}): it is not a model of "
                    f"the kind the table was built for ({self.table.metadata.get('model_type')!r})"
                )
            axes = [self.space_dims[d]["widths"] for d in term.dims]
            ms = (
                _lookup(term.table, axes, [int(s.widths[d]) for d in term.dims], term.name)
                if term.dims
                else float(term.table)
            )
            out.append((term.name, ms))
        return out

    def predict(self, structure) -> float:
        """Predicted latency in ms (see the module doc for what ``structure`` may be)."""
        return float(sum(ms for _, ms in self.breakdown(structure)))

    def dense_ms(self) -> float:
        return self.predict(Structure({n: d["size"] for n, d in self.space_dims.items()}))

    def solver_terms(self, space=None, around: dict[str, int] | None = None) -> list[LatencyTermSpec]:
        """Terms indexed by choice index of ``space``'s dimensions (default: the table's own space).
        ``around`` (current choice index per dimension) matters only to models that re-linearise.

        A space whose widths differ from the table's (other group sizes; only with allow_mismatch)
        gets every term resampled onto its widths by multilinear interpolation.
        """
        if space is None:
            return [
                LatencyTermSpec(t.name, list(t.dims), np.array(t.table, dtype=np.float64), t.block) for t in self.terms
            ]
        out = []
        for t in self.terms:
            for d in t.dims:
                if d not in space.dimensions:
                    raise LatencyTableError(f"term {t.name!r} needs dimension {d!r}, which the space does not have")
            src = [self.space_dims[d]["widths"] for d in t.dims]
            dst = [space.dimensions[d].widths() for d in t.dims]
            grid = np.array(t.table, dtype=np.float64) if src == dst else interpolate_grid(src, t.table, dst)
            out.append(LatencyTermSpec(t.name, list(t.dims), grid, t.block))
        return out


class TableLatencyModel(LatencyModel):
    """Multi-dimensional lookup tables, summed over kept blocks (the MDP latency model, default).

    ``calibration`` uses the dense model timed end to end when the table was built: ``"scale"`` (default)
    multiplies every term by measured / predicted dense latency — a block timed alone misses the cache
    context it has inside the model (its input was just written by the previous block; ResNet-50 cells
    sum to ~15% more than the model, see docs/latency.md) —, ``"offset"`` adds the difference as a
    constant term, ``"none"`` uses the raw cells. It rests on one end-to-end measurement: time it on a
    quiet machine. Without a reference measurement it is ``"none"``.
    """

    name = "table"

    def __init__(self, table: LatencyTable, space=None, calibration: str = "scale", allow_mismatch: bool = False):
        if calibration not in ("scale", "offset", "none"):
            raise ValueError("calibration must be 'scale', 'offset' or 'none'")
        super().__init__(table, space, allow_mismatch)
        self.calibration = calibration if table.reference.get("dense_measured_ms") else "none"

    def raw_terms(self) -> list[LatencyTermSpec]:
        return [LatencyTermSpec(t.name, list(t.dims), self.table.term_values(t), t.block) for t in self.table.terms]

    def _build_terms(self) -> list[LatencyTermSpec]:
        terms = self.raw_terms()
        if self.calibration == "none":
            return terms
        measured = float(self.table.reference["dense_measured_ms"])
        predicted = dense_latency_ms(terms)
        if self.calibration == "scale":
            factor = measured / predicted
            return [LatencyTermSpec(t.name, t.dims, t.table * factor, t.block) for t in terms]
        return terms + [LatencyTermSpec("calibration offset", [], np.array(measured - predicted), None)]

    @property
    def calibration_factor(self) -> float:
        ref = self.table.reference.get("dense_measured_ms")
        if not ref:
            return 1.0
        return float(ref) / dense_latency_ms(self.raw_terms())


class LinearLatencyModel(LatencyModel):
    """HALP-style linear model (ablation), as the official code's HALP baseline (NVlabs/MDP
    resnet50+ablation/prune/latency_targeted_pruning.py): a layer's channel groups each cost their marginal
    latency along the layer's *output* channels, LUT(input, out) - LUT(input, out - group), with the input
    width frozen at its current value and no effect charged downstream; re-linearised at every pruning step
    around the current widths (``solver_terms(space, around=...)``). Each term becomes its value at the
    current point plus one 1-D curve per output axis (the telescoped sum of those marginals); its input axes
    (``TermDef.input_axes``) carry no cost. A removed block saves its cost at the current point."""

    name = "linear"
    relinearises = True  # the pruning engine passes the current widths at every step

    def __init__(self, table: LatencyTable, space=None, calibration: str = "scale", allow_mismatch: bool = False):
        super().__init__(table, space, allow_mismatch)
        self.source = TableLatencyModel(table, None, calibration, allow_mismatch)

    def _build_terms(self) -> list[LatencyTermSpec]:
        return self.solver_terms(None)

    def solver_terms(self, space=None, around: dict[str, int] | None = None) -> list[LatencyTermSpec]:
        """``around``: the choice index of each dimension to linearise at (default: dense)."""
        input_axes = [list(t.input_axes) for t in self.table.terms]
        out = []
        for i, t in enumerate(self.source.solver_terms(space)):
            grid = np.asarray(t.table, dtype=np.float64)
            if not t.dims:
                out.append(LatencyTermSpec(t.name, [], grid, t.block))
                continue
            point = tuple((around or {}).get(d, grid.shape[a] - 1) for a, d in enumerate(t.dims))
            base = float(grid[point])
            out.append(LatencyTermSpec(f"{t.name} (current)", [], np.array(base), t.block))
            frozen = input_axes[i] if i < len(input_axes) else []
            for axis, d in enumerate(t.dims):
                if axis in frozen:
                    continue
                index = list(point)
                index[axis] = slice(None)
                out.append(LatencyTermSpec(f"{t.name} / {d}", [d], grid[tuple(index)] - base, t.block))
        return out


class FlopsLatencyModel(LatencyModel):
    """FLOPs (``metric="flops"``) or parameter-count (``metric="params"``) proxy: the same terms with
    each cell's FLOPs / parameters of the timed module, scaled so the dense model costs ``dense_ms``
    (default: the table's end-to-end dense measurement, else the table's dense prediction)."""

    name = "flops"

    def __init__(
        self,
        table: LatencyTable,
        space=None,
        metric: str = "flops",
        dense_ms: float | None = None,
        allow_mismatch: bool = False,
    ):
        if metric not in ("flops", "params"):
            raise ValueError("metric must be 'flops' or 'params'")
        super().__init__(table, space, allow_mismatch)
        self.metric = metric
        self.name = metric
        if dense_ms is None:
            dense_ms = (
                table.reference.get("dense_measured_ms") or TableLatencyModel(table, calibration="none").dense_ms()
            )
        self.reference_ms = float(dense_ms)

    def _build_terms(self) -> list[LatencyTermSpec]:
        raw = [(t, self.table.term_values(t, self.metric)) for t in self.table.terms]
        total = sum(float(g[(-1,) * g.ndim]) for _, g in raw)
        if total <= 0:
            warnings.warn(f"the table has no {self.metric} counts; the proxy predicts 0", stacklevel=2)
            total = 1.0
        scale = self.reference_ms / total
        return [LatencyTermSpec(t.name, list(t.dims), g * scale, t.block) for t, g in raw]


__all__ = [
    "FlopsLatencyModel",
    "LatencyModel",
    "LatencyTermSpec",
    "LinearLatencyModel",
    "Structure",
    "TableLatencyModel",
    "as_structure",
]
