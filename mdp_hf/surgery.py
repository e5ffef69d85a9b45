"""Physical slicing: a choice of kept units and blocks -> a smaller model that computes the same function.

The family-specific work lives in the adapters; this module is the entry point that every caller
(trainer, one-shot API, tests) uses, so validation and checks happen in one place.
"""

from __future__ import annotations

from .adapters import GateSet, PruningChoice, PruningSpace, get_adapter
from .adapters.base import check_group_size_keys


def build_space(
    model, group_sizes: dict[str, int] | None = None, min_keep: dict[str, int] | None = None
) -> PruningSpace:
    """The model's pruning space: dimensions (size, group, minimum, coupling), blocks."""
    space = get_adapter(model).build_space(model, group_sizes, min_keep)
    check_group_size_keys(space, group_sizes)
    return space


def gate_model(model, space: PruningSpace, choice: PruningChoice | None = None) -> GateSet:
    """Install gates on ``model`` (shapes unchanged); optionally set them to ``choice``. Call ``.remove()`` to undo."""
    gates = get_adapter(model).install_gates(model, space)
    if choice is not None:
        gates.apply_choice(choice)
    return gates


def slice_model(model, space: PruningSpace, choice: PruningChoice):
    """A new, physically smaller model (the family's pruned format) for ``choice``; ``model`` is left untouched."""
    adapter = get_adapter(model)
    pruned = adapter.slice(model, space, choice)
    expected = adapter.expected_num_parameters(pruned.config)
    actual = sum(p.numel() for p in pruned.parameters())
    if expected != actual:  # a slicing bug, never user error: fail loudly rather than save a wrong model
        raise AssertionError(f"sliced model has {actual} parameters but its structure implies {expected}")
    return pruned
