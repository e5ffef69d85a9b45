"""Physical slicing: a choice of kept units and blocks -> a smaller model that computes the same function.

The family-specific work lives in the adapters; this module is the entry point that every caller
(trainer, one-shot API, tests) uses, so validation and checks happen in one place.
"""

from __future__ import annotations

import copy

import torch

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


class ChoiceNotTranslatable(RuntimeError):
    """A family's pruned format does not keep the dense model's dimension and block names (a family bug)."""


def choice_on_sliced(
    space: PruningSpace, sliced_from: PruningChoice, choice: PruningChoice, sliced_space: PruningSpace
) -> PruningChoice:
    """``choice`` (over the dense ``space``) expressed over ``sliced_space``, the space of the model that
    ``slice_model(dense, space, sliced_from)`` made: a sliced model keeps the dense model's dimension and block
    names, each dimension's kept units in ascending order. ``choice`` must keep a subset of what ``sliced_from``
    kept (the monotone schedule). Raises :class:`ChoiceNotTranslatable` naming what does not correspond."""
    kept: dict[str, list[int]] = {}
    for name, dim in sliced_space.dimensions.items():
        if name not in space.dimensions:
            raise ChoiceNotTranslatable(f"the sliced model has a dimension {name!r} that the dense model lacks")
        before = sliced_from.kept_indices(space, name)
        if dim.size != len(before):
            raise ChoiceNotTranslatable(
                f"dimension {name!r} has {dim.size} units in the sliced model but the choice it was sliced with "
                f"kept {len(before)}"
            )
        position = {unit: i for i, unit in enumerate(before)}
        now = choice.kept_indices(space, name)
        lost = [unit for unit in now if unit not in position]
        if lost:
            raise ChoiceNotTranslatable(
                f"dimension {name!r}: units {lost[:5]} are kept now but were removed before (not monotone)"
            )
        kept[name] = [position[unit] for unit in now]
    removed = [block for block in choice.removed_blocks if block not in sliced_from.removed_blocks]
    missing = [block for block in removed if block not in sliced_space.blocks]
    if missing:
        raise ChoiceNotTranslatable(f"blocks {missing} are not blocks of the sliced model")
    lost_blocks = [block for block in sliced_from.removed_blocks if block not in choice.removed_blocks]
    if lost_blocks:
        raise ChoiceNotTranslatable(f"blocks {lost_blocks} were removed before but are kept now (not monotone)")
    return PruningChoice(kept=kept, removed_blocks=removed)


def compose_sources(
    outer: dict[str, tuple[str, torch.Tensor]], inner: dict[str, tuple[str, torch.Tensor]]
) -> dict[str, tuple[str, torch.Tensor]]:
    """Sources of a model sliced twice: ``inner`` maps the second slice's parameters into the first slice,
    ``outer`` the first slice's into the original; the result maps the second slice's into the original."""
    composed = {}
    for name, (middle, index) in inner.items():
        source, middle_index = outer[middle]
        composed[name] = (source, middle_index.flatten()[index])
    return composed


class NotASelectionError(ValueError):
    """A parameter of the sliced model is not a plain selection of one parameter's entries of the gated model
    (so per-entry state, such as an optimizer's moments, cannot follow it)."""


def parameter_sources(model, space: PruningSpace, choice: PruningChoice) -> dict[str, tuple[str, torch.Tensor]]:
    """For every parameter of ``slice_model(model, space, choice)`` (by name): the name of the ``model`` parameter
    it is cut from and, per entry, the flat index of the entry it copies (a LongTensor of the sliced shape).

    Found with the family's own slicing, not a second copy of it: the model is sliced once with every parameter
    holding its entries' global numbers (float64, exact), and once with random values to check that each sliced
    parameter is exactly that selection. ``model`` comes back unchanged. Raises :class:`NotASelectionError` naming
    the parameter when a sliced parameter is made of several parameters, computed from them, or not found in the
    model, or when one entry lands in two places of the sliced model (a parameter shared between layers that keep
    different units: one state per entry cannot follow both)."""
    params = dict(model.named_parameters())  # a tied parameter once, under its first name
    names = list(params)
    sizes = torch.tensor([params[n].numel() for n in names], dtype=torch.float64)
    starts = torch.cumsum(sizes, 0) - sizes
    generator = torch.Generator().manual_seed(0)  # the run's random state is left alone (bit-identical resume)
    numbered = _slice_with_values(
        model,
        space,
        choice,
        {n: torch.arange(params[n].numel(), dtype=torch.float64).add_(starts[k]) for k, n in enumerate(names)},
    )
    randoms = {n: torch.randn(params[n].numel(), generator=generator, dtype=torch.float64) for n in names}
    checked = _slice_with_values(model, space, choice, randoms)
    sources: dict[str, tuple[str, torch.Tensor]] = {}
    taken: dict[str, tuple[str, torch.Tensor]] = {}  # source parameter -> (first sliced user, entries it took)
    for name, values in numbered.items():
        flat = values.flatten()
        ok = (
            bool(flat.numel())
            and bool(torch.all(flat == flat.round()))
            and 0 <= flat.min()
            and flat.max() < sizes.sum()
        )
        owner = int(torch.searchsorted(starts, flat.min(), right=True)) - 1 if ok else -1
        ok = ok and owner == int(torch.searchsorted(starts, flat.max(), right=True)) - 1
        index = (flat - starts[owner]).long() if ok else None
        source = names[owner] if ok else None
        if not ok or not torch.equal(checked[name].flatten(), randoms[source][index]):
            raise NotASelectionError(
                f"sliced parameter {name!r} is not a selection of one parameter's entries of the gated model "
                "(it combines several parameters, or is computed from them)"
            )
        if source in taken:
            other, used = taken[source]
            if torch.isin(index, used).any():
                raise NotASelectionError(
                    f"parameter {source!r} of the gated model lands both in {other!r} and in {name!r} of the sliced "
                    "model: it is shared between layers that keep the same units, so one optimizer state per entry "
                    "cannot follow both copies"
                )
            taken[source] = (other, torch.cat([used, index]))
        else:
            taken[source] = (name, index)
        if torch.unique(index).numel() != index.numel():
            raise NotASelectionError(f"sliced parameter {name!r} repeats entries of {source!r} of the gated model")
        sources[name] = (source, index.view(values.shape))
    return sources


def _slice_with_values(model, space, choice, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sliced model's parameters when ``model``'s parameters hold ``values`` (flat float64) instead of their
    own; the model's own tensors are put back afterwards."""
    params = dict(model.named_parameters())
    own = {name: param.data for name, param in params.items()}
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)  # the sliced model is built in float64 too: numbers stay exact
        for name, param in params.items():
            param.data = values[name].to(param.device).view(param.shape)
        sliced = get_adapter(model).slice(model, space, choice)
        return {name: param.detach().cpu() for name, param in sliced.named_parameters()}
    finally:
        torch.set_default_dtype(default)
        for name, param in params.items():
            param.data = own[name]


def copy_sliced_model(model):
    """An independent copy of a sliced model that training continues on (its own tensors, no gradients, eval mode),
    without what training put on the live one: Accelerate's mixed-precision forward wrapper."""
    clone = copy.deepcopy(model)
    for attr in ("forward", "_original_forward"):  # instance attributes: the class's own forward comes back
        clone.__dict__.pop(attr, None)
    clone.zero_grad(set_to_none=True)
    return clone.eval()
