"""Exact latency-constrained pruning solver (no torch): problem data, Pyomo model, exact backends."""

from .api import BACKENDS, solve
from .problem import (
    FORMAT_VERSION,
    Block,
    Dimension,
    InfeasibleBudgetError,
    LatencyTerm,
    NoSolutionWithinTimeLimit,
    ObjectiveTerm,
    Problem,
    ProblemError,
    Solution,
)
from .pyomo_model import BackendUnavailable, build_milp, build_minlp
from .structure import NotApplicable

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "BackendUnavailable",
    "Block",
    "Dimension",
    "InfeasibleBudgetError",
    "LatencyTerm",
    "NoSolutionWithinTimeLimit",
    "NotApplicable",
    "ObjectiveTerm",
    "Problem",
    "ProblemError",
    "Solution",
    "build_milp",
    "build_minlp",
    "solve",
]
