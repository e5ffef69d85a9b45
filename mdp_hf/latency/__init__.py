"""Latency stage: measured lookup tables on the target device and latency models built on them.

Typical use::

    from mdp_hf.latency import build_table, LatencyTable, TableLatencyModel, measure_latency
    table = build_table(model, "table.json", group_sizes={"embed": 16}, subgrid=2, batch_size=1, threads=1)
    lat = TableLatencyModel(table)               # or TableLatencyModel(LatencyTable.load("table.json", expect=...))
    lat.predict((space, choice)); lat.predict(sliced_model)   # ms
    terms = lat.solver_terms(space)              # plain numpy terms for the solver
    measure_latency(sliced_model, threads=1, repeats=30).ms   # same protocol, measured

See docs/latency.md and docs/latency_table_format.md.
"""

from .models import (
    FlopsLatencyModel,
    LatencyModel,
    LatencyTermSpec,
    LinearLatencyModel,
    Structure,
    TableLatencyModel,
    as_structure,
)
from .profiler import build_table, interpolation_report, run_metadata
from .table import (
    IncompleteTableError,
    LatencyTable,
    LatencyTableError,
    LatencyTableMismatchError,
    MeasuredTable,
    TermDef,
    pull_table,
    push_table,
)
from .timing import Measurement, TimingSettings, measure_latencies, measure_latency

__all__ = [
    "FlopsLatencyModel",
    "IncompleteTableError",
    "LatencyModel",
    "LatencyTable",
    "LatencyTableError",
    "LatencyTableMismatchError",
    "LatencyTermSpec",
    "LinearLatencyModel",
    "MeasuredTable",
    "Measurement",
    "Structure",
    "TableLatencyModel",
    "TermDef",
    "TimingSettings",
    "as_structure",
    "build_table",
    "interpolation_report",
    "measure_latencies",
    "measure_latency",
    "pull_table",
    "push_table",
    "run_metadata",
]
