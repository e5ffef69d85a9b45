"""Profiler: time the building blocks of a model at the widths the solver can choose.

``build_table(model, path, ...)`` asks the model's family for its latency cells (``ModelFamily.latency_cells``
in ``mdp_hf/adapters/``: which grids to time and how to build a cell), then measures the cells of each grid's sub-grid in shuffled chunks. Within a chunk every cell is
warmed up and then timed interleaved (round r times every cell once), the median of the repeats is
stored, and the table file is rewritten atomically after every chunk: an interrupted build resumes
where it stopped when the same command runs again (same settings and space, otherwise an error).
"""

from __future__ import annotations

import datetime
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..adapters import get_family
from .table import LatencyTable, LatencyTableError, MeasuredTable, TermDef, space_fingerprint, space_summary
from .timing import TimingSettings, device_name, measure_latency, thread_count, time_interleaved


def family_cells(model, space, settings):
    """The latency cells of the family that built ``space``."""
    cells_cls = get_family(space.model_type).latency_cells
    if cells_cls is None:
        raise LatencyTableError(
            f"the {space.model_type!r} family registers no latency cells, so no table can be built for it; "
            "use latency_model='flops' or register LatencyCells with the family"
        )
    return cells_cls(model, space, settings)


def _planned(cells) -> tuple[list[MeasuredTable], list[TermDef]]:
    grids, terms = cells.plan()
    tables = [
        MeasuredTable(g.key, g.kind, list(g.axis_kinds), [list(a) for a in g.axes], dict(g.params)) for g in grids
    ]
    defs = [TermDef(t.name, t.grid, list(t.dims), t.block, t.transform, list(t.input_axes)) for t in terms]
    return tables, defs


def _parse_subgrid(subgrid) -> Callable[[str], int]:
    if subgrid is None:
        return lambda kind: 1
    if isinstance(subgrid, int):
        return lambda kind: max(1, subgrid)
    return lambda kind: max(1, int(subgrid.get(kind, subgrid.get("default", 1))))


def subgrid_indices(n: int, stride: int, tail: bool = False) -> list[int]:
    """Every ``stride``-th choice index, always including the first and the last (the dense width);
    with ``tail`` also the one before the last, so no interpolation spans the dense width."""
    indices = set(range(0, n, stride)) | {n - 1}
    if tail and n >= 2:
        indices.add(n - 2)
    return sorted(indices)


def run_metadata(model, space, settings: TimingSettings, blocks=None) -> dict:
    """What a table built now for ``model`` would record; pass it as ``expect`` when loading a table."""
    import transformers

    from .. import __version__

    blocks = blocks or family_cells(model, space, settings)
    summary = space_summary(space)
    return {
        "device": torch.device(settings.device).type,
        "device_name": device_name(settings.device),
        "batch_size": settings.batch_size,
        "image_size": blocks.image_size,
        "dtype": settings.dtype,
        "threads": settings.threads if torch.device(settings.device).type == "cpu" else None,
        "attn_implementation": settings.attn_implementation if blocks.uses_attention else None,
        "model_type": space.model_type,
        "model_shapes": blocks.model_shapes(),
        "space_fingerprint": space_fingerprint(summary),
        "group_sizes": {d.kind: d.group_size for d in space.dimensions.values()},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "mdp_hf_version": __version__,
    }


def load_table_for(source: str, model, space, settings: TimingSettings, allow_mismatch: bool = False) -> LatencyTable:
    """The table ``source`` names (a file, a folder holding latency_table.json, or a Hub repo id), validated and
    checked against this run: its metadata (device, batch, dtype, shapes, space) and its terms against the
    terms ``model``'s family plans. A mistyped local path is a FileNotFoundError saying it does not exist."""
    import os

    from ..paths import check_local_path
    from .table import pull_table

    cells = family_cells(model, space, settings)
    kwargs = {"expect": run_metadata(model, space, settings, cells), "allow_mismatch": allow_mismatch, "space": space}
    if os.path.isfile(source):
        table = LatencyTable.load(source, **kwargs)
    else:
        if not os.path.isdir(source):
            check_local_path(source, "latency table")
        table = pull_table(source, **kwargs)
    table.check_terms(cells.plan()[1])
    return table


def _count(module, args) -> tuple[float, float]:
    with FlopCounterMode(display=False) as counter:
        module(*args)
    return float(counter.get_total_flops()), float(sum(p.numel() for p in module.parameters()))


def build_table(
    model,
    path: str | Path | None = None,
    *,
    space=None,
    group_sizes: dict | None = None,
    min_keep: dict | None = None,
    settings: TimingSettings | None = None,
    subgrid: int | dict | None = None,
    validate: int = 0,
    calibrate: bool = True,
    recheck: float | None = 0.15,
    chunk_size: int = 64,
    progress: bool = True,
    timer: Callable[[MeasuredTable, tuple], float] | None = None,
    overwrite: bool = False,
    seed: int = 0,
    **setting_overrides,
) -> LatencyTable:
    """Measure a latency table for ``model`` (dense HF model or an mdp_* model) and return it.

    - ``settings`` / keyword overrides: device, batch_size, image_size, dtype, threads, attn_implementation,
      warmup, repeats, statistic (see ``TimingSettings``).
    - ``subgrid``: measure every k-th choice of each axis (int, or per dimension kind, e.g.
      ``{"embed": 2, "qk": 4, "v": 4, "mlp": 4}``), always including the smallest and the dense width;
      the rest is interpolated multilinearly in width. ``None`` measures the full grid.
    - ``validate``: also time this many random cells *off* the sub-grid per table (interpolation check,
      stored in ``table.validation``).
    - ``calibrate``: time the dense deployed model end to end with the same protocol (``table.reference``).
    - ``recheck``: after the sub-grid is measured, time again every cell that differs by more than this
      fraction from the median of its sub-grid neighbours and keep the faster timing (interference only
      slows runs down; real discontinuities such as the SDPA q == v fast path are simply confirmed).
      ``None`` disables it.
    - ``path``: the file is rewritten after every chunk; if it exists, the build resumes from it.
    - ``timer``: replaces real timing by ``timer(table, widths) -> ms`` (tests, synthetic studies).
    """
    from ..adapters import build_space

    settings = TimingSettings(**{**(settings.to_dict() if settings else {}), **setting_overrides})
    space = space or build_space(model, group_sizes, min_keep)
    model = model.eval()
    blocks = family_cells(model, space, settings)
    metadata = run_metadata(model, space, settings, blocks)
    tables, terms = _planned(blocks)
    stride_of = _parse_subgrid(subgrid)
    for t in tables:
        full = set(t.params.get("full_axes", []))  # axes with a discontinuity are never sub-sampled
        tail = set(t.params.get("tail_axes", []))  # the dense width is special: measure its neighbour too
        t.subgrid = [
            subgrid_indices(len(axis), 1 if a in full else stride_of(kind), a in tail)
            for a, (kind, axis) in enumerate(zip(t.axis_names, t.axes))
        ]
    table = LatencyTable(
        # "timer": a table filled by a custom timer holds no device's latencies (nothing to verify against)
        metadata={
            **metadata,
            "subgrid": subgrid,
            "timing": settings.to_dict(),
            "timer": "custom" if timer else "measured",
        },
        space=space_summary(space),
        tables={t.key: t for t in tables},
        terms=terms,
    )
    path = Path(path) if path is not None else None
    if path is not None and path.exists() and not overwrite:
        _resume_from(table, LatencyTable.load(path), metadata, space)
    table.metadata.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    table.metadata.setdefault("build_seconds", 0.0)

    rng = random.Random(seed)
    todo = [(t, cell, False) for t in table.tables.values() for cell in t.cells_todo()]
    if validate:
        done = {(v["table"], tuple(v["cell"])) for v in table.validation}
        for t in table.tables.values():
            off = [c for c in np.ndindex(*t.shape) if not all(i in s for i, s in zip(c, t.subgrid))]
            rng_t = random.Random(f"{seed}:{t.key}")
            picks = rng_t.sample(off, min(validate, len(off)))
            todo += [(t, tuple(map(int, c)), True) for c in picks if (t.key, tuple(map(int, c))) not in done]
    rng.shuffle(todo)  # spread drift over tables and widths

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="cell", desc=f"latency table ({space.model_type})", dynamic_ncols=True)
    start = time.perf_counter()
    threads = settings.threads if torch.device(settings.device).type == "cpu" else None
    try:
        with thread_count(threads):
            for begin in range(0, len(todo), chunk_size):
                chunk = todo[begin : begin + chunk_size]
                _measure_chunk(chunk, blocks, settings, timer, table)
                table.metadata["build_seconds"] = round(
                    table.metadata["build_seconds"] + time.perf_counter() - start, 3
                )
                start = time.perf_counter()
                if path is not None:
                    table.save(path)
                if bar is not None:
                    bar.update(len(chunk))
            if recheck and timer is None:
                suspects = [(t, cell, False) for t in table.tables.values() for cell in outlier_cells(t, recheck)]
                rng.shuffle(suspects)
                table.metadata["rechecked_cells"] = table.metadata.get("rechecked_cells", 0) + len(suspects)
                if bar is not None:
                    bar.total += len(suspects)
                    bar.set_postfix_str(f"re-timing {len(suspects)} outliers")
                for begin in range(0, len(suspects), chunk_size):
                    chunk = suspects[begin : begin + chunk_size]
                    _measure_chunk(chunk, blocks, settings, timer, table, keep_min=True)
                    if path is not None:
                        table.save(path)
                    if bar is not None:
                        bar.update(len(chunk))
            if calibrate and timer is None and not table.reference:
                dense = blocks.dense_model()
                m = measure_latency(dense, settings, inputs=blocks.example_input(), repeats=max(settings.repeats, 20))
                table.reference = {
                    "dense_measured_ms": m.ms,
                    "dense_median_ms": m.median_ms,
                    "dense_min_ms": m.min_ms,
                    "dense_spread": m.spread,
                }
                if m.spread > 0.1:
                    warnings.warn(
                        f"the dense reference timing is noisy (inter-quartile spread {100 * m.spread:.0f}% of the median): "
                        "the machine was busy, so cells and calibration may be biased; rebuild on an idle machine",
                        stacklevel=2,
                    )
                del dense
    finally:
        if bar is not None:
            bar.close()
    table.metadata["build_seconds"] = round(table.metadata["build_seconds"] + time.perf_counter() - start, 3)
    if path is not None:
        table.save(path)
    return table


def _resume_from(table: LatencyTable, old: LatencyTable, metadata: dict, space) -> None:
    old.check(metadata, allow_mismatch=False, space=space_summary(space))
    for key, t in table.tables.items():
        previous = old.tables.get(key)
        if previous is None or previous.axes != t.axes:
            continue
        t.values, t.flops, t.param_counts = previous.values, previous.flops, previous.param_counts
    table.validation = [v for v in old.validation if v["table"] in table.tables]
    table.reference = old.reference
    for key in ("date", "build_seconds"):
        if key in old.metadata:
            table.metadata[key] = old.metadata[key]


def outlier_cells(t: MeasuredTable, tolerance: float) -> list[tuple[int, ...]]:
    """Measured sub-grid cells more than ``tolerance`` (relative) away from the median of their sub-grid
    neighbours along every axis: candidates for a second timing (interference from other processes
    only ever slows a run down, so the faster of two timings is kept)."""
    out = []
    position = [{idx: k for k, idx in enumerate(sub)} for sub in t.subgrid]
    for cell in t.subgrid_cells():
        value = t.values[cell]
        if np.isnan(value):
            continue
        neighbours = []
        for axis, sub in enumerate(t.subgrid):
            k = position[axis][cell[axis]]
            for step in (-1, 1):
                if 0 <= k + step < len(sub):
                    other = list(cell)
                    other[axis] = sub[k + step]
                    neighbours.append(t.values[tuple(other)])
        neighbours = [v for v in neighbours if not np.isnan(v)]
        if len(neighbours) >= 2:
            local = float(np.median(neighbours))
            if abs(value - local) > tolerance * local:
                out.append(cell)
    return out


def _measure_chunk(chunk, blocks, settings: TimingSettings, timer, table: LatencyTable, keep_min: bool = False) -> None:
    built = []
    for t, cell, is_validation in chunk:
        widths = t.widths_at(cell)
        module, x = blocks.build_cell(t, widths)
        args = x if isinstance(x, tuple) else (x,)
        with torch.inference_mode():
            flops, params = _count(module, args)
        built.append((t, cell, is_validation, widths, module, args, flops, params))
    if timer is not None:
        times = [float(timer(t, widths)) for t, _, _, widths, *_ in built]
    else:
        calls = [(lambda m=module, a=args: m(*a)) for *_, module, args, _, _ in built]
        times = [
            m.ms
            for m in time_interleaved(calls, settings.device, settings.warmup, settings.repeats, settings.statistic)
        ]
    for (t, cell, is_validation, widths, _, _, flops, params), ms in zip(built, times):
        if is_validation:
            table.validation.append({"table": t.key, "cell": list(cell), "widths": list(widths), "ms": round(ms, 6)})
        else:
            if keep_min and not np.isnan(t.values[cell]):
                ms = min(ms, float(t.values[cell]))
            t.values[cell], t.flops[cell], t.param_counts[cell] = ms, flops, params


def interpolation_report(table: LatencyTable) -> dict:
    """Error of the interpolated grid at the validation cells (measured off the sub-grid)."""
    errors = []
    for v in table.validation:
        predicted = float(table.tables[v["table"]].filled()[tuple(v["cell"])])
        errors.append(abs(predicted - v["ms"]) / max(v["ms"], 1e-12))
    if not errors:
        return {"cells": 0}
    return {
        "cells": len(errors),
        "mean_abs_pct": 100 * float(np.mean(errors)),
        "max_abs_pct": 100 * float(np.max(errors)),
    }


__all__ = [
    "build_table",
    "family_cells",
    "interpolation_report",
    "load_table_for",
    "outlier_cells",
    "run_metadata",
    "subgrid_indices",
]
