"""An optimizer that follows its model onto the sliced form: the same parameter groups (hyperparameters,
weight-decay membership, learning rates), each sliced parameter taking the state of the entries it is cut from.

Only optimizers whose state is per entry and whose update reads nothing but the entry's own values are sliced:
then one step of the sliced model is one step of the masked model on its kept entries. Others (factored or
trust-ratio optimizers, unknown classes) are refused with :class:`OptimizerNotSliceable`, never sliced
approximately.
"""

from __future__ import annotations

from collections import defaultdict

import torch

#: optimizer classes (exact types: a subclass may change the update) whose state is per entry
SLICEABLE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class OptimizerNotSliceable(ValueError):
    """The optimizer's state cannot follow the model onto its sliced form."""


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def check_sliceable(optimizer) -> None:
    """Raise :class:`OptimizerNotSliceable` naming the class or the state entry that cannot be sliced."""
    inner = torch_optimizer(optimizer)
    kind = type(inner)
    if kind not in SLICEABLE_OPTIMIZERS:
        known = ", ".join(f"torch.optim.{k.__name__}" for k in SLICEABLE_OPTIMIZERS)
        raise OptimizerNotSliceable(
            f"the optimizer {kind.__module__}.{kind.__qualname__} is not one whose state is known to be per entry "
            f"({known}), so its state cannot be sliced"
        )
    for group in inner.param_groups:
        for param in group["params"]:
            for key, value in inner.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise OptimizerNotSliceable(
                        f"the optimizer's state {key!r} has shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(param.shape)}: it is not per entry, so it cannot be sliced"
                    )


def slice_optimizer_(
    optimizer,
    old_params: dict[str, torch.nn.Parameter],
    new_params: dict[str, torch.nn.Parameter],
    sources: dict[str, tuple[str, torch.Tensor]],
) -> None:
    """Point ``optimizer`` (in place, so LR schedulers and Accelerate's wrapper keep working) at ``new_params``.

    ``sources`` (from :func:`mdp_hf.surgery.parameter_sources`): per new parameter, the old parameter it is cut
    from and the flat indices of its entries. Each new parameter joins the group of its old one, in the old one's
    place (in ``new_params`` order when several are cut from one); per-entry state is gathered, scalar state (the
    step count) copied; old parameters with nothing kept leave the optimizer, parameters of other modules stay.
    Checked first (:func:`check_sliceable`): nothing is changed when it raises."""
    check_sliceable(optimizer)
    inner = torch_optimizer(optimizer)
    name_of = {id(param): name for name, param in old_params.items()}
    successors: dict[str, list[str]] = defaultdict(list)
    for new_name, (source, _) in sources.items():
        successors[source].append(new_name)
    groups, state = [], {}
    for group in inner.param_groups:
        params = []
        for param in group["params"]:
            name = name_of.get(id(param))
            if name is None:  # not the model's (e.g. a learnable loss weight): unchanged
                params.append(param)
                if param in inner.state:
                    state[param] = inner.state[param]
                continue
            old_state = inner.state.get(param, {})
            for new_name in successors.get(name, []):
                new = new_params[new_name]
                index = sources[new_name][1]
                params.append(new)
                if old_state:
                    state[new] = {key: _gather(value, index) for key, value in old_state.items()}
        groups.append(params)
    for group, params in zip(inner.param_groups, groups):
        group["params"] = params
    inner.state = defaultdict(dict, state)


def _gather(value, index: torch.Tensor):
    if not torch.is_tensor(value):
        return value
    if value.dim() == 0:  # the step count
        return value.clone()
    return value.flatten()[index.to(value.device)].clone()
