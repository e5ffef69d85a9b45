"""Between the model and the solver: build the MDP problem from scores and latency terms, and turn the
solver's choice ("keep k groups of dimension d, keep block b") back into kept unit indices.

Groups are consecutive runs of units in descending-score order, so keeping ``widths[c]`` units means
keeping the ``widths[c]`` highest-scoring units, and I_d[c] is their summed score (DESIGN §1).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .adapters import GateSet, PruningChoice, PruningSpace, get_adapter
from .solver.problem import Block, Dimension, LatencyTerm, ObjectiveTerm, Problem, Solution


def gate_model(model, space: PruningSpace, choice: PruningChoice | None = None) -> GateSet:
    """Install gates on ``model`` (shapes unchanged); optionally set them to ``choice``. Call ``.remove()`` to undo."""
    gates = get_adapter(model).install_gates(model, space)
    if choice is not None:
        gates.apply_choice(choice)
    return gates


def prunes(prune: Iterable[str], kind: str) -> bool:
    """Whether a ``PrunableConfig.prune`` list switches on ``kind`` ("all": every kind the space declares, and blocks)."""
    prune = set(prune)
    return "all" in prune or kind in prune


def ranked_units(scores: np.ndarray) -> np.ndarray:
    """Unit indices by descending score; ties broken by index so every rank computes the same order."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(scores.size), -scores))


def build_problem(
    space: PruningSpace,
    scores: dict[str, np.ndarray],
    latency_terms: Iterable,
    budget_ms: float,
    prune: Iterable[str] = ("all",),
    metadata: dict | None = None,
    shares: dict[str, list[tuple[str | None, np.ndarray]]] | None = None,
    active: PruningChoice | None = None,
    keep_full: Iterable[str] = (),
    merge_blocks: dict[str, str] | None = None,
) -> Problem:
    """The MDP problem for ``space``.

    ``scores[d]`` holds one importance value per unit of dimension d. ``latency_terms`` are objects with
    ``name, dims, table, block`` (the latency model's solver terms). A dimension whose kind is not in
    ``prune`` is fixed at full width; blocks are removable only if "blocks" is in ``prune``; "all" (the
    default) prunes every kind the space declares, and blocks.

    ``shares[d]`` splits a shared dimension's importance among its member layers (the official CNN rule:
    each unit's score in proportion to each member's own score, see mdp_hf.importance): a list of
    ``(block or None, per-unit share)``, each share counted only while its block is kept; units are still
    ranked by ``scores[d]``. A dimension outside every block without shares (ViT's embedding width) is
    never charged to blocks.

    ``active`` (monotone iterative pruning, as the official engine): the choice of the previous pruning
    step. Only its kept units are ranked, widths stop at its kept count (the latency tables are sliced
    to those widths), and its removed blocks stay removed. ``keep_full``: dimensions fixed at their
    largest allowed width (a CNN stem, as the official code does). ``merge_blocks`` maps blocks of the space
    to one keep bit they share (ViT attention + MLP -> the whole layer, as the official block notebook).
    """
    merge = merge_blocks or {}
    owner = lambda block: merge.get(block, block) if block is not None else None  # noqa: E731
    prune = set(prune)
    keep_full = set(keep_full)
    shares = shares or {}
    missing = sorted(set(space.dimensions) - set(scores))
    if missing:
        raise ValueError(f"no importance scores for dimensions {missing[:5]}; accumulate scores for the whole space")
    candidates = {name: _candidates(space, name, active) for name in space.dimensions}
    # scale so the dense objective is 1e6: solvers then compare numbers of a sane magnitude
    total = sum(float(np.asarray(scores[name], dtype=np.float64)[candidates[name]].sum()) for name in space.dimensions)
    scale = 1e6 / total if total > 0 else 1.0

    dimensions, objective_terms, fixed = [], [], {}
    for name, dim in space.dimensions.items():
        widths = [w for w in dim.widths() if w <= len(candidates[name])]
        dimensions.append(Dimension(name, widths))
        if not prunes(prune, dim.kind) or name in keep_full:
            fixed[name] = len(widths) - 1
        unit_scores = np.asarray(scores[name], dtype=np.float64)
        if unit_scores.shape != (dim.size,):
            raise ValueError(f"scores for '{name}' have shape {unit_scores.shape}, expected ({dim.size},)")
        order = candidates[name][ranked_units(unit_scores[candidates[name]])]

        def top_k_sums(values, order=order, widths=widths):
            cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64)[order])]) * scale
            return [float(cumulative[w]) for w in widths]

        if dim.block is not None:
            objective_terms.append(ObjectiveTerm(name, top_k_sums(unit_scores), owner(dim.block)))
        elif name in shares:
            objective_terms += [ObjectiveTerm(name, top_k_sums(share), owner(block)) for block, share in shares[name]]
        else:
            objective_terms.append(ObjectiveTerm(name, top_k_sums(unit_scores), None))

    removed_before = {owner(b) for b in active.removed_blocks} if active is not None else set()
    members: dict[str, list] = {}
    for name, block in space.blocks.items():
        members.setdefault(owner(name), []).append(block)
    blocks = [
        Block(name, removable=all(b.removable for b in group) and (prunes(prune, "blocks") or name in removed_before))
        for name, group in members.items()
    ]
    fixed_blocks = {name: False for name in removed_before}
    choices = {d.name: len(d.widths) for d in dimensions}
    terms = []
    for t in latency_terms:
        table = np.asarray(t.table, dtype=np.float64)
        table = table[tuple(slice(0, choices[d]) for d in t.dims)] if t.dims else table
        terms.append(LatencyTerm(t.name, list(t.dims), table, owner(t.block)))
    meta = {"model_type": space.model_type, "importance_scale": scale, **(metadata or {})}
    problem = Problem(
        dimensions,
        blocks,
        objective_terms,
        terms,
        float(budget_ms),
        fixed_choices=fixed,
        fixed_blocks=fixed_blocks,
        metadata=meta,
    )
    problem.validate()
    return problem


def _candidates(space: PruningSpace, name: str, active: PruningChoice | None) -> np.ndarray:
    """Units a step may keep: all of them, or (monotone) the ones the previous step kept."""
    if active is None:
        return np.arange(space.dimensions[name].size)
    return np.asarray(active.kept_indices(space, name), dtype=np.int64)


def choice_from_solution(
    space: PruningSpace,
    scores: dict[str, np.ndarray],
    solution: Solution,
    active: PruningChoice | None = None,
    merge_blocks: dict[str, str] | None = None,
) -> PruningChoice:
    """Kept unit indices (the top-scoring ``widths[c]`` candidate units) per dimension, and the removed blocks."""
    kept = {}
    for name, dim in space.dimensions.items():
        width = dim.widths()[solution.choices[name]]
        candidates = _candidates(space, name, active)
        order = candidates[ranked_units(np.asarray(scores[name], dtype=np.float64)[candidates])]
        kept[name] = sorted(int(i) for i in order[:width])
    dropped = {name for name, keep in solution.blocks.items() if not keep}
    removed = sorted(name for name in space.blocks if (merge_blocks or {}).get(name, name) in dropped)
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
