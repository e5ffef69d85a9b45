"""Latency tables: measured cells over the widths a solver may choose, their metadata, the file format.

A :class:`LatencyTable` holds

- ``metadata``: how and where it was measured (device, batch, image size, dtype, threads, attention
  implementation, library versions, model shapes, pruning-space fingerprint, date);
- ``space``: the pruning space it was built for (dimensions with their widths, blocks);
- ``tables``: measured grids (:class:`MeasuredTable`), one per *distinct* building block — identical
  layers share one grid. Cells that were not measured are NaN; a sub-grid (``subgrid``: measured choice
  indices per axis) is filled by multilinear interpolation in width;
- ``terms``: the additive latency model: each term reads one grid through the space's dimensions
  (``dims``) and is paid only while its ``block`` is kept (None: always paid);
- ``reference``: the dense model measured end to end with the same protocol (for calibration);
- ``validation``: optional extra cells measured off the sub-grid, to report interpolation error.

The file is one JSON document (docs/latency_table_format.md), written atomically, so a build can
rewrite it after every chunk of cells and resume after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "mdp_hf.latency_table"
FORMAT_VERSION = 1
DEFAULT_FILENAME = "latency_table.json"

#: metadata fields that make a table unusable for a run when they differ
STRICT_FIELDS = (
    "device",
    "device_name",
    "batch_size",
    "image_size",
    "dtype",
    "threads",
    "attn_implementation",
    "model_type",
    "model_shapes",
    "space_fingerprint",
)
#: fields that only warn when they differ (timings rarely move between patch releases)
SOFT_FIELDS = ("torch_version", "transformers_version")
#: metadata every table must carry (values may be null where the field does not apply, e.g. threads on CUDA):
#: without them the device / batch / dtype / shape checks against a run could not happen
REQUIRED_METADATA = STRICT_FIELDS
#: the stored end-to-end dense timing and the summed dense cells must agree within this factor: real tables of
#: real models measure 0.85-1.26 (docs/latency.md), tiny models dominated by per-call overhead ~3; a factor
#: beyond 10 means a wrong unit, or cells and reference of different models or devices
REFERENCE_AGREEMENT = 10.0
#: a structure at the smallest widths (every block kept) costing this much more than the dense one is inverted
INVERSION_MARGIN = 1.05
# a block predicted below -10 % of its dense cost at some widths: its cells do not add up (see validate)
BLOCK_FLOOR_MARGIN = 0.1


class LatencyTableError(ValueError):
    """A latency table file is malformed, incomplete or does not fit the request."""


class LatencyTableWarning(UserWarning):
    """A latency table looks suspicious but may be right (e.g. a grid where narrower costs more everywhere)."""


class IncompleteTableError(LatencyTableError):
    """Some cells of the (sub-)grid have not been measured yet: resume the build."""


class LatencyTableMismatchError(LatencyTableError):
    """The table was measured under different settings than the current run.

    ``differences`` maps each differing field to ``(table value, run value)``.
    """

    def __init__(self, message: str, differences: dict):
        super().__init__(message)
        self.differences = differences


# ---------------------------------------------------------------------------------------------------
def space_summary(space) -> dict:
    """JSON-able description of a pruning space: what a table needs to know about it."""
    return {
        "model_type": space.model_type,
        "dimensions": {
            name: {
                "kind": d.kind,
                "size": d.size,
                "group_size": d.group_size,
                "min_keep": d.min_keep,
                "block": d.block,
                "widths": d.widths(),
            }
            for name, d in space.dimensions.items()
        },
        "blocks": {
            name: {"kind": b.kind, "dims": list(b.dims), "removable": b.removable} for name, b in space.blocks.items()
        },
    }


def space_fingerprint(summary: dict) -> str:
    """Short hash of a space summary (dimension sizes, groups, minimums, blocks)."""
    payload = json.dumps(
        {
            "dims": {
                n: [d["kind"], d["size"], d["group_size"], d["min_keep"], d["block"]]
                for n, d in summary["dimensions"].items()
            },
            "blocks": sorted(summary["blocks"]),
            "model_type": summary["model_type"],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _space_diff(table_space: dict, run_space: dict) -> str:
    a, b = table_space.get("dimensions", {}), run_space.get("dimensions", {})
    notes = []
    for name in sorted(set(a) | set(b), key=lambda n: (n not in a, n)):
        if name not in a:
            notes.append(f"{name} missing in the table")
        elif name not in b:
            notes.append(f"{name} not in this model")
        else:
            for key in ("size", "group_size", "min_keep"):
                if a[name][key] != b[name][key]:
                    notes.append(f"{name}.{key} table {a[name][key]} vs run {b[name][key]}")
    if set(table_space.get("blocks", {})) != set(run_space.get("blocks", {})):
        notes.append("removable blocks differ")
    return "; ".join(notes[:6]) + (f"; ... ({len(notes)} differences)" if len(notes) > 6 else "")


# ---------------------------------------------------------------------------------------------------
def interpolate_grid(axes: list[list[int]], values: np.ndarray, points: list[list[float]]) -> np.ndarray:
    """Separable (multilinear) interpolation of ``values`` given on the product of ``axes`` (widths) at
    the product of ``points`` (widths per axis; clamped to the axis range)."""
    out = np.asarray(values, dtype=np.float64)
    for axis, (src, dst) in enumerate(zip(axes, points)):
        src = np.asarray(src, dtype=np.float64)
        dst = np.asarray(dst, dtype=np.float64)
        if len(src) == 1:
            out = np.repeat(out, len(dst), axis=axis)
            continue
        out = np.apply_along_axis(lambda line: np.interp(dst, src, line), axis, out)
    return out


@dataclass
class MeasuredTable:
    """One measured grid: ``values[i0, i1, ...]`` = ms at widths ``axes[0][i0], axes[1][i1], ...``.

    ``flops`` and ``params`` hold the FLOP count and parameter count of the timed module per cell (the
    FLOPs proxy reads them). ``subgrid`` lists the choice indices measured along each axis; the
    remaining cells are interpolated (``measured`` marks which cells were timed).
    """

    key: str
    kind: str
    axis_names: list[str]
    axes: list[list[int]]
    params: dict = field(default_factory=dict)
    subgrid: list[list[int]] | None = None
    values: np.ndarray | None = None
    flops: np.ndarray | None = None
    param_counts: np.ndarray | None = None

    def __post_init__(self):
        shape = self.shape
        if self.subgrid is None:
            self.subgrid = [list(range(n)) for n in shape]
        for name in ("values", "flops", "param_counts"):
            array = getattr(self, name)
            array = np.full(shape, np.nan) if array is None else np.asarray(array, dtype=np.float64).reshape(shape)
            setattr(self, name, array)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a) for a in self.axes)

    @property
    def measured(self) -> np.ndarray:
        return ~np.isnan(self.values)

    def subgrid_cells(self) -> list[tuple[int, ...]]:
        return [
            tuple(self.subgrid[a][i] for a, i in enumerate(idx)) for idx in np.ndindex(*[len(s) for s in self.subgrid])
        ]

    def cells_todo(self) -> list[tuple[int, ...]]:
        return [cell for cell in self.subgrid_cells() if np.isnan(self.values[cell])]

    def widths_at(self, cell: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.axes[a][i] for a, i in enumerate(cell))

    def filled(self, what: str = "values") -> np.ndarray:
        """The full grid: measured cells as measured, others interpolated from the sub-grid."""
        array = {"values": self.values, "flops": self.flops, "params": self.param_counts}[what]
        sub = array[np.ix_(*self.subgrid)]
        if np.isnan(sub).any():
            missing = int(np.isnan(sub).sum())
            raise IncompleteTableError(
                f"table {self.key!r}: {missing} of {sub.size} sub-grid cells are not measured; resume the build "
                "(run the same `mdp-hf latency build` command again) to finish it"
            )
        sub_widths = [[self.axes[a][i] for i in idx] for a, idx in enumerate(self.subgrid)]
        full = interpolate_grid(sub_widths, sub, self.axes)
        known = ~np.isnan(array)
        full[known] = array[known]
        return full

    def to_dict(self) -> dict:
        def nested(array):
            return (
                np.where(np.isnan(array), None, np.round(array, 6)).tolist()
                if array.ndim
                else (None if np.isnan(array) else float(array))
            )

        return {
            "kind": self.kind,
            "axis_names": self.axis_names,
            "axes": self.axes,
            "params": self.params,
            "subgrid": self.subgrid,
            "values_ms": nested(self.values),
            "flops": nested(self.flops),
            "param_counts": nested(self.param_counts),
        }

    @classmethod
    def from_dict(cls, key: str, data: dict) -> MeasuredTable:
        def array(value):
            return np.array(value, dtype=np.float64) if value is not None else None  # None -> nan via dtype float

        return cls(
            key=key,
            kind=data["kind"],
            axis_names=list(data["axis_names"]),
            axes=[list(map(int, a)) for a in data["axes"]],
            params=dict(data.get("params", {})),
            subgrid=[list(map(int, s)) for s in data["subgrid"]],
            values=array(data.get("values_ms")),
            flops=array(data.get("flops")),
            param_counts=array(data.get("param_counts")),
        )


@dataclass
class TermDef:
    """One additive latency term: grid ``table`` read at the choices of ``dims`` (one per grid axis).

    ``transform`` = ``"half_anchor"`` subtracts half of the grid's last slice along its last axis (the
    shared part of an attention block); ``"interaction"`` keeps the mixed difference over the last two
    axes (the q x v interaction of attention). See the ViT family's latency cells (mdp_hf/adapters/vit.py) and docs/latency.md.
    ``input_axes``: axes that are the timed module's input width (a conv's input channels); HALP's linear
    model charges a layer's cost to its output channels only, with its input frozen.
    """

    name: str
    table: str
    dims: list[str]
    block: str | None = None
    transform: str | None = None
    input_axes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "table": self.table,
            "dims": self.dims,
            "block": self.block,
            "transform": self.transform,
            "input_axes": list(self.input_axes),
        }


def apply_transform(values: np.ndarray, transform: str | None) -> np.ndarray:
    if transform is None:
        return values
    if transform == "half_anchor":  # minus half the slice at the dense width of the last axis
        return values - 0.5 * values[..., -1:]
    if transform == "interaction":  # the mixed difference over the last two axes (zero on the dense row/column)
        return values - values[..., :, -1:] - values[..., -1:, :] + values[..., -1:, -1:]
    raise LatencyTableError(f"unknown term transform {transform!r}")


# ---------------------------------------------------------------------------------------------------
@dataclass
class LatencyTable:
    metadata: dict
    space: dict
    tables: dict[str, MeasuredTable]
    terms: list[TermDef]
    reference: dict = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)
    #: where the table came from (its file, or its Hub repo and file name), for error messages
    source: str = field(default="latency table", compare=False, repr=False)

    # -- progress -----------------------------------------------------------------------------------
    @property
    def num_cells(self) -> int:
        return sum(len(t.subgrid_cells()) for t in self.tables.values())

    @property
    def num_measured(self) -> int:
        return sum(int(t.measured.sum()) for t in self.tables.values())

    @property
    def complete(self) -> bool:
        return all(not t.cells_todo() for t in self.tables.values())

    def term_values(self, term: TermDef, what: str = "values") -> np.ndarray:
        """Full grid of a term in ms (or FLOPs / params), indexed by choice index of each of ``term.dims``."""
        table = self.tables[term.table]
        values = table.filled(what)
        return apply_transform(values, term.transform)  # FLOPs / params split like the ms grid

    def dim_widths(self, name: str) -> list[int]:
        return list(self.space["dimensions"][name]["widths"])

    # -- compatibility -------------------------------------------------------------------------------
    def check(self, expect: dict | None, allow_mismatch: bool = False, space: dict | None = None) -> dict:
        """Compare with the run's metadata; raise LatencyTableMismatchError naming every differing field.

        Returns the differences (empty when everything matches). With ``allow_mismatch`` differences
        only warn. Version fields only ever warn.
        """
        differences = {}
        for key in STRICT_FIELDS:
            if expect is not None and key in expect and self.metadata.get(key, _MISSING) != expect[key]:
                differences[key] = (self.metadata.get(key, "<missing>"), expect[key])
        soft = {
            k: (self.metadata[k], expect[k])
            for k in SOFT_FIELDS
            if expect is not None and k in expect and k in self.metadata and expect[k] != self.metadata[k]
        }
        if soft:
            warnings.warn("latency table measured with other library versions: " + _format(soft), stacklevel=3)
        if differences:
            detail = ""
            if "space_fingerprint" in differences and space is not None:
                detail = f" (pruning spaces differ: {_space_diff(self.space, space)})"
            message = (
                "latency table does not match this run: " + _format(differences) + detail + ". Latencies depend on "
                "all of these; rebuild the table for this setting (`mdp-hf latency build ...`), or pass "
                "allow_mismatch=True (--allow-mismatch) to use it anyway."
            )
            if not allow_mismatch:
                raise LatencyTableMismatchError(message, differences)
            warnings.warn(message, stacklevel=3)
        return differences

    def check_terms(self, planned, source: str | None = None) -> None:
        """Compare the table's terms with the terms the model's family plans for this model (``planned``:
        objects with ``name``, ``dims``, ``block``, ``transform``, as ``LatencyCells.plan()[1]``). A term missing
        from the table, one the model does not have, or one read through other dimensions or gated by another
        block is a LatencyTableMismatchError naming them (also with allow_mismatch: the latency model would be
        wrong whatever the settings)."""
        source = source or self.source

        def signature(term):
            return (list(term.dims), term.block, term.transform)

        have = {t.name: signature(t) for t in self.terms}
        want = {t.name: signature(t) for t in planned}
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        changed = [n for n in want if n in have and have[n] != want[n]]
        if not (missing or extra or changed):
            return
        notes = []
        for label, names in (("missing in the table", missing), ("not in this model", extra), ("different", changed)):
            if names:
                notes.append(f"{label}: {names[:6]}{' ...' if len(names) > 6 else ''} ({len(names)})")
        raise LatencyTableMismatchError(
            f"{source}: terms: the table's latency terms are not this model's ({'; '.join(notes)}). It was built "
            "for another model, by another mdp_hf version, or edited; rebuild it for this model "
            "(`mdp-hf latency build`)",
            {"terms": (sorted(have), sorted(want))},
        )

    # -- file format -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "metadata": self.metadata,
            "space": self.space,
            "reference": self.reference,
            "terms": [t.to_dict() for t in self.terms],
            "tables": {key: t.to_dict() for key, t in self.tables.items()},
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "latency table") -> LatencyTable:
        """Build a table from its JSON object and check its structure (:meth:`validate_structure`); errors name
        ``source`` (the file) and the field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LatencyTableError(f"{source}: not an mdp_hf latency table (format {found!r}, expected {FORMAT!r})")
        try:
            version = int(data.get("format_version", 0))
        except (TypeError, ValueError):
            raise LatencyTableError(
                f"{source}: format_version must be an integer, got {data['format_version']!r}"
            ) from None
        if version > FORMAT_VERSION:
            raise LatencyTableError(
                f"{source}: latency table format version {data['format_version']} is newer than this mdp_hf supports "
                f"({FORMAT_VERSION}); upgrade mdp_hf"
            )
        for name, kind in (("metadata", dict), ("space", dict), ("tables", dict), ("terms", list)):
            if name not in data:
                raise LatencyTableError(
                    f"{source}: the field {name!r} is missing; a table without it cannot be checked against a run "
                    "or used. Rebuild it with `mdp-hf latency build` (docs/latency_table_format.md)"
                )
            if not isinstance(data[name], kind):
                raise LatencyTableError(f"{source}: the field {name!r} must be a JSON {kind.__name__}")
        for name, kind in (("reference", dict), ("validation", list)):
            if not isinstance(data.get(name, kind()), kind):
                raise LatencyTableError(f"{source}: the field {name!r} must be a JSON {kind.__name__}")
        try:
            tables = {key: MeasuredTable.from_dict(key, t) for key, t in data["tables"].items()}
            terms = [TermDef(**t) for t in data["terms"]]
        except (KeyError, TypeError, ValueError) as error:
            raise LatencyTableError(f"{source}: malformed latency table: {error}") from error
        table = cls(
            data["metadata"],
            data["space"],
            tables,
            terms,
            data.get("reference", {}),
            data.get("validation", []),
            source=source,
        )
        return table.validate_structure(source)

    # -- validation ----------------------------------------------------------------------------------
    def validate_structure(self, source: str | None = None) -> LatencyTable:
        """Checks that need no measured cell: required metadata, the space and its fingerprint, every term's
        grid and axes, every removable block and every dimension paid by some term, finite cells.
        Raises LatencyTableError naming ``source`` (default: :attr:`source`) and the field."""
        source = source or self.source

        def bad(field_name: str, why: str):
            raise LatencyTableError(f"{source}: {field_name}: {why}")

        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if missing:
            bad(
                "metadata",
                f"lacks the required field(s) {missing}, so the table could not be checked against the run's "
                "device, batch size, dtype and shapes. Rebuild it with `mdp-hf latency build` "
                "(docs/latency_table_format.md lists the fields)",
            )
        dims, blocks = self.space.get("dimensions"), self.space.get("blocks")
        if not isinstance(dims, dict) or not isinstance(blocks, dict) or not dims:
            bad("space", "must hold the 'dimensions' and 'blocks' of the pruning space it was built for")
        for name, d in dims.items():
            if not isinstance(d, dict) or not all(k in d for k in ("kind", "size", "group_size", "min_keep", "widths")):
                bad(f"space.dimensions[{name!r}]", "needs kind, size, group_size, min_keep, block and widths")
        if self.metadata["space_fingerprint"] != space_fingerprint(self.space):
            bad(
                "metadata.space_fingerprint",
                f"{self.metadata['space_fingerprint']!r} does not match the table's own space "
                f"({space_fingerprint(self.space)!r}): the space was edited after the table was measured; rebuild it",
            )
        names = set()
        for term in self.terms:
            where = f"terms[{term.name!r}]"
            if term.name in names:
                bad(where, "is defined twice")
            names.add(term.name)
            if term.table not in self.tables:
                bad(where, f"refers to missing table {term.table!r}")
            grid = self.tables[term.table]
            if len(term.dims) != len(grid.axes):
                bad(where, f"has {len(term.dims)} dims but its table has {len(grid.axes)} axes")
            for dim, axis in zip(term.dims, grid.axes):
                if dim not in dims or dims[dim]["widths"] != axis:
                    bad(where, f"axis widths do not match dimension {dim!r} of the table's space")
            if term.block is not None and term.block not in blocks:
                bad(where, f"is gated by block {term.block!r}, which the table's space does not have")
            if term.transform not in (None, "half_anchor", "interaction"):
                bad(where, f"unknown transform {term.transform!r}")
        unpaid = [b for b in blocks if not any(t.block == b for t in self.terms)]
        if unpaid:
            bad(
                "terms",
                f"no latency term is paid while block(s) {unpaid[:8]}{' ...' if len(unpaid) > 8 else ''} "
                f"({len(unpaid)} of {len(blocks)}) are kept, so the solver would see them as free. The table is "
                "incomplete or was edited; rebuild it with `mdp-hf latency build`",
            )
        unused = [d for d in dims if not any(d in t.dims for t in self.terms)]
        if unused:
            bad(
                "terms",
                f"no latency term depends on dimension(s) {unused[:8]}{' ...' if len(unused) > 8 else ''}, so "
                "their width would cost nothing. The table is incomplete or was edited; rebuild it",
            )
        for key, grid in self.tables.items():
            for name in ("values", "flops", "param_counts"):
                array = getattr(grid, name)
                if np.isinf(array).any():
                    field_name = {"values": "values_ms"}.get(name, name)
                    bad(
                        f"tables[{key!r}].{field_name}",
                        f"{int(np.isinf(array).sum())} cell(s) are not finite (Infinity or NaN; an unmeasured cell "
                        "is null). Rebuild or resume the table",
                    )
        for name in ("dense_measured_ms", "dense_median_ms", "dense_min_ms"):
            if name in self.reference:
                value = self.reference[name]
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not np.isfinite(value)
                    or value <= 0
                ):
                    bad(
                        f"reference.{name}",
                        f"must be a positive number of ms (the dense model timed end to end), got {value!r}. "
                        "Rebuild the table, or remove the reference to use the raw cells (calibration 'none')",
                    )
        return self

    def dense_and_smallest_ms(self) -> tuple[float, float]:
        """Raw (uncalibrated) predicted latency of the dense structure and of the structure with every width
        at its smallest choice and every block kept. Needs a complete table."""
        dense = smallest = 0.0
        for term in self.terms:
            grid = self.term_values(term)
            dense += float(grid[(-1,) * grid.ndim])
            smallest += float(grid[(0,) * grid.ndim])
        return dense, smallest

    def block_floors(self, max_cells: int = 4_000_000) -> dict[str, tuple[float, float, dict[str, int]]]:
        """Per removable block: the least raw (uncalibrated) cost of its terms summed, over every combination of
        the widths they read, its cost at the dense widths, and the widths of the least. A block that can cost zero
        or less looks free to keep, so the solver keeps it rather than removing it. Blocks whose joint grid exceeds
        ``max_cells`` are left out."""
        by_block: dict[str, list[TermDef]] = {}
        for term in self.terms:
            if term.block is not None:
                by_block.setdefault(term.block, []).append(term)
        floors = {}
        for block, terms in by_block.items():
            if any(len(set(term.dims)) != len(term.dims) for term in terms):
                continue  # a width read twice by one term: the joint grid is a diagonal, not a product
            dims = list(dict.fromkeys(d for term in terms for d in term.dims))
            grids = [(term.dims, self.term_values(term)) for term in terms]
            sizes = {d: n for term_dims, grid in grids for d, n in zip(term_dims, grid.shape)}
            if int(np.prod([sizes[d] for d in dims])) > max_cells:
                continue
            total = np.zeros([sizes[d] for d in dims])
            for term_dims, grid in grids:
                order = sorted(range(len(term_dims)), key=lambda axis: dims.index(term_dims[axis]))
                total = total + np.transpose(grid, order).reshape([sizes[d] if d in term_dims else 1 for d in dims])
            where = np.unravel_index(int(np.argmin(total)), total.shape)
            widths = {d: int(self.dim_widths(d)[i]) for d, i in zip(dims, where)}
            floors[block] = (float(total[where]), float(total[(-1,) * total.ndim]), widths)
        return floors

    def validate(self, source: str | None = None, allow_mismatch: bool = False) -> LatencyTable:
        """:meth:`validate_structure`, and for a complete table its totals: the dense structure must cost a finite,
        positive time (cells may be negative one by one: a correction term), and the dense cells must agree with the
        end-to-end ``reference`` within a factor of ``REFERENCE_AGREEMENT`` (only a warning with ``allow_mismatch``).
        Warnings (LatencyTableWarning): the smallest structure (every width smallest, every block kept) costing
        zero or less, or more than the dense one (inverted costs), and a grid whose smallest width costs more than
        its full width along an axis in every cell. Returns self."""
        source = source or self.source
        checked = (source, allow_mismatch, self.num_measured, len(self.terms), json.dumps(self.reference, default=str))
        if getattr(self, "_validated", None) == checked:
            return self  # several latency models over one table: checked once
        self.validate_structure(source)
        if not self.complete:
            return self  # a build in progress: IncompleteTableError when it is used

        def bad(field_name: str, why: str, soft: bool = False):
            message = f"{source}: {field_name}: {why}"
            if soft and allow_mismatch:
                warnings.warn(message, LatencyTableWarning, stacklevel=3)
                return
            raise LatencyTableError(message)

        dense, smallest = self.dense_and_smallest_ms()
        if not np.isfinite(dense) or dense <= 0:
            bad(
                "tables",
                f"the dense cells sum to {dense:.6g} ms; a latency must be positive (zero or negative cells would give a "
                "zero or negative budget). The table is damaged; rebuild it",
            )
        measured = self.reference.get("dense_measured_ms")
        if measured:
            ratio = float(measured) / dense
            if not 1 / REFERENCE_AGREEMENT <= ratio <= REFERENCE_AGREEMENT:
                bad(
                    "reference.dense_measured_ms",
                    f"the dense model was timed end to end at {float(measured):.6g} ms but its cells sum to "
                    f"{dense:.6g} ms (ratio {ratio:.3g}, allowed {1 / REFERENCE_AGREEMENT:.3g}-{REFERENCE_AGREEMENT:g}): "
                    "cells and reference do not describe the same model and device (wrong unit, edited cells or "
                    "reference). Rebuild the table; allow_mismatch=True (PrunableConfig.latency_allow_mismatch, "
                    "--allow-mismatch) uses it anyway",
                    soft=True,
                )
        # Noisy timings (few repeats on a busy machine) can produce both of the following on a real table, and the
        # solver stays exact for any costs: a warning makes them visible without refusing a table that may be right.
        if not np.isfinite(smallest) or smallest <= 0:
            warnings.warn(
                f"{source}: tables: the structure at the smallest widths (every block kept) sums to {smallest:.6g} ms "
                "(the decomposed cells do not add up to a positive time: noisy or damaged cells); predictions of "
                "small structures are wrong. Rebuild the table on an idle device with more repeats",
                LatencyTableWarning,
                stacklevel=3,
            )
        elif smallest > INVERSION_MARGIN * dense:
            warnings.warn(
                f"{source}: tables: inverted costs: the structure at the smallest widths (every block kept) costs "
                f"{smallest:.6g} ms, more than the dense one ({dense:.6g} ms), so pruning widths would slow the model "
                "down. The cells are reversed or were measured on a disturbed machine; rebuild the table on an idle "
                "device with more repeats unless this is really how the device behaves",
                LatencyTableWarning,
                stacklevel=3,
            )
        # The embedded DeiT's CPU tables put an attention layer's least cost at +10 to +14 % of its dense cost when
        # built alone (one slow build: -2 %), at -17 to -20 % beside two busy processes (docs/testing.md)
        free = {
            block: (ms, dense_ms, widths)
            for block, (ms, dense_ms, widths) in self.block_floors().items()
            if ms < -BLOCK_FLOOR_MARGIN * abs(dense_ms)
        }
        if free and np.isfinite(smallest) and smallest > 0:  # (a non-positive smallest structure was named above)
            block, (ms, dense_ms, widths) = min(free.items(), key=lambda item: item[1][0] / abs(item[1][1]))
            warnings.warn(
                f"{source}: tables: {len(free)} block(s) cost well below zero at some widths, so keeping them looks "
                f"free and the solver prefers that to removing them: {block!r} sums to {ms:.6g} ms "
                f"({100 * ms / abs(dense_ms):.0f}% of its dense cost) at "
                f"{', '.join(f'{d}={w}' for d, w in widths.items())}. The decomposed cells do not add up (timed on a "
                "busy machine?); predictions of small structures are wrong. Rebuild the table on an idle device",
                LatencyTableWarning,
                stacklevel=3,
            )
        inverted = []
        for key, grid in self.tables.items():
            values = grid.filled()
            # axes whose dense width the family declares special (SDPA's qk == v fast path) may well invert
            special = set(grid.params.get("tail_axes", [])) | set(grid.params.get("full_axes", []))
            for axis, name in enumerate(grid.axis_names):
                if values.shape[axis] >= 2 and axis not in special:
                    narrow, full = np.take(values, 0, axis=axis), np.take(values, -1, axis=axis)
                    if np.all(narrow > INVERSION_MARGIN * full):
                        inverted.append(f"{key!r} along {name}")
        if inverted:
            warnings.warn(
                f"{source}: tables: in {len(inverted)} grid axis/axes the smallest width costs more than the full "
                f"width in every cell ({'; '.join(inverted[:4])}{' ...' if len(inverted) > 4 else ''}); check the "
                "measurement (a backend fast path, or a disturbed machine)",
                LatencyTableWarning,
                stacklevel=3,
            )
        self._validated = checked
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename): an interrupted write never corrupts the table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_dict(), handle, separators=(",", ":"))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a table is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expect: dict | None = None,
        allow_mismatch: bool = False,
        space=None,
        source: str | None = None,
    ) -> LatencyTable:
        """Read a table, validate it (:meth:`validate`), and with ``expect`` (the run's metadata, see
        ``run_metadata``) check it matches. ``source`` names the table in errors (default: the path)."""
        source = source or str(path)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle, parse_constant=_non_finite)
        except FileNotFoundError:
            raise FileNotFoundError(f"latency table {source} does not exist") from None
        except IsADirectoryError:
            raise LatencyTableError(
                f"latency table {source} is a directory; give the file (e.g. {Path(path) / DEFAULT_FILENAME})"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise LatencyTableError(f"{source} is not valid JSON ({error}); the file is damaged") from error
        table = cls.from_dict(data, source).validate(source, allow_mismatch)
        table.check(expect, allow_mismatch, space_summary(space) if space is not None else None)
        return table


_MISSING = object()


def _non_finite(constant: str) -> float:
    # JSON has no NaN/Infinity (Python writes them anyway): read them as infinity, which validation refuses;
    # an unmeasured cell is null
    return float("inf")


def _format(differences: dict) -> str:
    return "; ".join(f"{k}: table {_short(a)} vs run {_short(b)}" for k, (a, b) in differences.items())


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------
def _is_local_dir(repo_id) -> bool:
    return isinstance(repo_id, (str, os.PathLike)) and Path(repo_id).is_dir()


def push_table(
    table: LatencyTable | str | os.PathLike,
    repo_id: str,
    filename: str = DEFAULT_FILENAME,
    commit_message: str | None = None,
    token: str | None = None,
    repo_type: str = "model",
    revision: str | None = None,
) -> str:
    """Upload a table to a Hub repository (``huggingface_hub.upload_file``) like any other artefact.

    ``repo_id`` may also be an existing local directory (the table is copied there). Returns the
    location written.
    """
    from ..paths import check_local_path

    if not _is_local_dir(repo_id):
        check_local_path(repo_id, "destination folder")  # a mistyped local folder is not a Hub repo id
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(table, LatencyTable):
            source = table.save(Path(tmp) / filename)
        else:
            source = Path(table)
            LatencyTable.load(source)  # never publish a damaged file
        if _is_local_dir(repo_id):
            target = Path(repo_id) / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            return str(target)
        import huggingface_hub

        meta = LatencyTable.load(source).metadata
        message = (
            commit_message
            or f"Add latency table ({meta.get('device_name')}, batch {meta.get('batch_size')}, {meta.get('dtype')})"
        )
        huggingface_hub.create_repo(repo_id, repo_type=repo_type, token=token, exist_ok=True)
        huggingface_hub.upload_file(
            path_or_fileobj=str(source),
            path_in_repo=filename,
            repo_id=repo_id,
            repo_type=repo_type,
            token=token,
            revision=revision,
            commit_message=message,
        )
        return f"{repo_id}/{filename}"


def pull_table(
    repo_id: str,
    filename: str = DEFAULT_FILENAME,
    revision: str | None = None,
    expect: dict | None = None,
    allow_mismatch: bool = False,
    space=None,
    **download_kwargs,
) -> LatencyTable:
    """Download a table from a Hub repository (``huggingface_hub.hf_hub_download``) or a local directory,
    and check it against ``expect`` like ``LatencyTable.load``."""
    from ..paths import check_local_path

    if _is_local_dir(repo_id):
        path = Path(repo_id) / filename
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (folder {repo_id} has no {filename})")
        source = str(path)
    else:
        check_local_path(repo_id, "latency table folder")
        import huggingface_hub

        path = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, **download_kwargs)
        source = f"{filename} of Hub repo {repo_id}" + (f" (revision {revision})" if revision else "")
    return LatencyTable.load(path, expect=expect, allow_mismatch=allow_mismatch, space=space, source=source)


__all__ = [
    "DEFAULT_FILENAME",
    "FORMAT",
    "FORMAT_VERSION",
    "IncompleteTableError",
    "LatencyTable",
    "LatencyTableError",
    "LatencyTableMismatchError",
    "LatencyTableWarning",
    "MeasuredTable",
    "TermDef",
    "interpolate_grid",
    "pull_table",
    "push_table",
    "space_fingerprint",
    "space_summary",
]
