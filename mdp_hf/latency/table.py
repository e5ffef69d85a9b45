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


class LatencyTableError(ValueError):
    """A latency table file is malformed, incomplete or does not fit the request."""


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
            if expect is not None and key in expect and key in self.metadata and expect[key] != self.metadata[key]:
                differences[key] = (self.metadata[key], expect[key])
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
    def from_dict(cls, data: dict) -> LatencyTable:
        if data.get("format") != FORMAT:
            raise LatencyTableError(f"not an mdp_hf latency table (format {data.get('format')!r}, expected {FORMAT!r})")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise LatencyTableError(
                f"latency table format version {data['format_version']} is newer than this mdp_hf supports "
                f"({FORMAT_VERSION}); upgrade mdp_hf"
            )
        try:
            tables = {key: MeasuredTable.from_dict(key, t) for key, t in data["tables"].items()}
            terms = [TermDef(**t) for t in data["terms"]]
        except (KeyError, TypeError, ValueError) as error:
            raise LatencyTableError(f"malformed latency table: {error}") from error
        for term in terms:
            if term.table not in tables:
                raise LatencyTableError(f"term {term.name!r} refers to missing table {term.table!r}")
            if len(term.dims) != len(tables[term.table].axes):
                raise LatencyTableError(
                    f"term {term.name!r} has {len(term.dims)} dims but its table has {len(tables[term.table].axes)} axes"
                )
            for dim, axis in zip(term.dims, tables[term.table].axes):
                if dim not in data["space"]["dimensions"] or data["space"]["dimensions"][dim]["widths"] != axis:
                    raise LatencyTableError(
                        f"term {term.name!r}: axis widths do not match dimension {dim!r} of the table's space"
                    )
        return cls(
            data["metadata"], data["space"], tables, terms, data.get("reference", {}), data.get("validation", [])
        )

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
        cls, path: str | os.PathLike, expect: dict | None = None, allow_mismatch: bool = False, space=None
    ) -> LatencyTable:
        """Read a table; with ``expect`` (the run's metadata, see ``run_metadata``) check it matches."""
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise LatencyTableError(f"{path} is not valid JSON ({error}); the file is damaged") from error
        table = cls.from_dict(data)
        table.check(expect, allow_mismatch, space_summary(space) if space is not None else None)
        return table


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
    if _is_local_dir(repo_id):
        path = Path(repo_id) / filename
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    else:
        import huggingface_hub

        path = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, **download_kwargs)
    return LatencyTable.load(path, expect=expect, allow_mismatch=allow_mismatch, space=space)


__all__ = [
    "DEFAULT_FILENAME",
    "FORMAT",
    "FORMAT_VERSION",
    "IncompleteTableError",
    "LatencyTable",
    "LatencyTableError",
    "LatencyTableMismatchError",
    "MeasuredTable",
    "TermDef",
    "interpolate_grid",
    "pull_table",
    "push_table",
    "space_fingerprint",
    "space_summary",
]
