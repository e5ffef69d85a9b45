"""Between the model and the solver: build the MDP problem from scores and latency terms, and turn the
solver's choice ("keep k groups of dimension d, keep block b") back into kept unit indices.

Groups are consecutive runs of units in descending-score order, so keeping ``widths[c]`` units means
keeping the ``widths[c]`` highest-scoring units, and I_d[c] is their summed score (DESIGN §1).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .adapters import PruningChoice, PruningSpace
from .solver.problem import Block, Dimension, LatencyTerm, ObjectiveTerm, Problem, Solution

# dimension kinds that a prune-list entry switches on
_KIND_SWITCH = {"embed": "embed", "heads": "heads", "qk": "qk", "v": "v", "mlp": "mlp", "channels": "channels", "residual": "residual"}


def ranked_units(scores: np.ndarray) -> np.ndarray:
    """Unit indices by descending score; ties broken by index so every rank computes the same order."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(scores.size), -scores))


def build_problem(
    space: PruningSpace,
    scores: dict[str, np.ndarray],
    latency_terms: Iterable,
    budget_ms: float,
    prune: Iterable[str] = ("embed", "heads", "qk", "v", "mlp", "channels", "residual", "blocks"),
    metadata: dict | None = None,
) -> Problem:
    """The MDP problem for ``space``.

    ``scores[d]`` holds one importance value per unit of dimension d. ``latency_terms`` are objects with
    ``name, dims, table, block`` (the latency model's solver terms). A dimension whose kind is not in
    ``prune`` is fixed at full width; blocks are removable only if "blocks" is in ``prune``.

    A dimension shared by several blocks (the embedding width, a residual width) has its score split
    equally between those blocks and one share outside every block, so removing a block loses exactly
    its share.
    """
    prune = set(prune)
    missing = sorted(set(space.dimensions) - set(scores))
    if missing:
        raise ValueError(f"no importance scores for dimensions {missing[:5]}; accumulate scores for the whole space")
    # scale so the dense objective is 1e6: solvers then compare numbers of a sane magnitude
    total = sum(float(np.asarray(scores[name], dtype=np.float64).sum()) for name in space.dimensions)
    scale = 1e6 / total if total > 0 else 1.0

    dimensions, objective_terms, fixed = [], [], {}
    for name, dim in space.dimensions.items():
        widths = dim.widths()
        dimensions.append(Dimension(name, widths))
        if _KIND_SWITCH.get(dim.kind) not in prune:
            fixed[name] = len(widths) - 1
        unit_scores = np.asarray(scores[name], dtype=np.float64)
        if unit_scores.shape != (dim.size,):
            raise ValueError(f"scores for '{name}' have shape {unit_scores.shape}, expected ({dim.size},)")
        cumulative = np.concatenate([[0.0], np.cumsum(unit_scores[ranked_units(unit_scores)])]) * scale
        values = [float(cumulative[w]) for w in widths]
        if dim.block is not None:
            objective_terms.append(ObjectiveTerm(name, values, dim.block))
        elif dim.shared_by:
            share = 1.0 / (len(dim.shared_by) + 1)
            objective_terms.append(ObjectiveTerm(name, [v * share for v in values], None))
            objective_terms += [ObjectiveTerm(name, [v * share for v in values], block) for block in dim.shared_by]
        else:
            objective_terms.append(ObjectiveTerm(name, values, None))

    blocks = [Block(name, removable=block.removable and "blocks" in prune) for name, block in space.blocks.items()]
    terms = [LatencyTerm(t.name, list(t.dims), np.asarray(t.table, dtype=np.float64), t.block) for t in latency_terms]
    meta = {"model_type": space.model_type, "importance_scale": scale, **(metadata or {})}
    problem = Problem(dimensions, blocks, objective_terms, terms, float(budget_ms), fixed_choices=fixed, metadata=meta)
    problem.validate()
    return problem


def choice_from_solution(space: PruningSpace, scores: dict[str, np.ndarray], solution: Solution) -> PruningChoice:
    """Kept unit indices (the top-scoring ``widths[c]`` units) per dimension, and the removed blocks."""
    kept = {}
    for name, dim in space.dimensions.items():
        width = dim.widths()[solution.choices[name]]
        kept[name] = sorted(int(i) for i in ranked_units(scores[name])[:width])
    removed = sorted(name for name, keep in solution.blocks.items() if not keep)
    return PruningChoice(kept, removed)


def kept_fraction_by_kind(space: PruningSpace, choice: PruningChoice) -> dict[str, float]:
    """Fraction of units kept per dimension kind (blocks that were removed count as zero)."""
    removed = set(choice.removed_blocks)
    totals: dict[str, list[int]] = {}
    for name, dim in space.dimensions.items():
        kept = 0 if dim.block in removed else len(choice.kept_indices(space, name))
        pair = totals.setdefault(dim.kind, [0, 0])
        pair[0] += kept
        pair[1] += dim.size
    fractions = {kind: kept / size for kind, (kept, size) in totals.items()}
    if space.blocks:
        fractions["blocks"] = 1 - len(removed) / len(space.blocks)
    return fractions
