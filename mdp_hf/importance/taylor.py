"""First-order Taylor importance, averaged over the iterations of an interval and EMA'd across pruning steps.

Every optimizer step the adapter hands over one signed score per unit (``ModelAdapter.taylor_scores``):
the official ViT score, the sum of w * dL/dw over the tensors linked to the unit (divided by a per-kind
constant), or a gate's gradient dL/dg = sum over the unit's activations of a * dL/da (for a gate right
after a BatchNorm this is the official CNN score gamma dL/dgamma + beta dL/dbeta). The accumulator turns
each step's score into |.| (official CNN) or (.)^2 (official ViT) and sums it; a pruning step averages the
sums over the interval and blends them into an exponential moving average (0.9 officially).

A shared CNN width (the residual stream that several convs add into) also gets one share per member layer,
as the official code splits it (NVlabs/MDP resnet50+ablation/prune/pruning.py, update_neuron_metric_mdp):
each step, the width's combined score |sum of the members' signed scores| is split in proportion to each
member's own |score|; the shares are summed like the scores.
"""

from __future__ import annotations

from enum import Enum

import torch


class ScoreKind(str, Enum):
    ABS = "abs"  # |s|  (paper: CNN channels)
    SQUARE = "square"  # s^2  (paper: ViT units)


class ImportanceAccumulator:
    """Collects per-unit scores for a set of named vectors (dimensions, and shares of shared dimensions).

    Call :meth:`add` once per optimizer step with that step's signed scores; :meth:`commit` at a pruning step
    averages the steps since the last one into the EMA and returns it as CPU float64 tensors;
    :meth:`state_dict` makes the accumulator resumable from a checkpoint.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        kind: ScoreKind | str = ScoreKind.SQUARE,
        ema_decay: float = 0.9,
        share_groups: dict[str, list[str]] | None = None,
    ):
        """``sizes``: units per scored name. ``share_groups``: shared dimension -> the names of its members'
        signed scores; each member name is also a key of ``sizes`` and accumulates that member's share."""
        self.kind = ScoreKind(kind)
        self.share_groups = dict(share_groups or {})
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.sums = {name: torch.zeros(size, dtype=torch.float64) for name, size in sizes.items()}
        self.count = 0
        self.ema: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def add(self, signed: dict[str, torch.Tensor], grad_scale: float = 1.0, reduce=None) -> bool:
        """Add one step's signed scores (divided by ``grad_scale``, e.g. an fp16 loss scale).

        ``reduce`` maps {name: score} to its mean over data-parallel ranks. Scores are linear in the
        gradients, so reducing them *before* |.| or (.)^2 gives every rank the scores one process would
        compute on the same global batch. Returns False (and adds nothing) for a step whose scores are not
        finite (an fp16 overflow step that the optimizer skips too).
        """
        missing = set(self.sums) - set(signed)
        if missing:
            raise ValueError(f"no score for {sorted(missing)[:5]} in this step")
        scores = {name: signed[name].detach().double().cpu() / grad_scale for name in self.sums}
        if reduce is not None:
            scores = reduce(scores)
        if not all(torch.isfinite(v).all() for v in scores.values()):
            return False
        members = {m for group in self.share_groups.values() for m in group}
        transformed = {
            name: value.abs() if self.kind is ScoreKind.ABS else value.square()
            for name, value in scores.items()
            if name not in members
        }
        for dim, group in self.share_groups.items():
            magnitudes = {m: scores[m].abs() for m in group}
            total = sum(magnitudes.values())
            total = torch.where(total > 0, total, torch.ones_like(total))  # no member moved: no share
            transformed.update({m: transformed[dim] * magnitude / total for m, magnitude in magnitudes.items()})
        for name, value in transformed.items():
            self.sums[name] += value
        self.count += 1
        return True

    def average(self) -> dict[str, torch.Tensor]:
        """Average over the steps accumulated since the last :meth:`commit`."""
        if self.count == 0:
            raise RuntimeError(
                "no importance was accumulated: run at least one training step with gates installed "
                "before pruning (check accumulation_steps in the PrunableConfig)"
            )
        return {name: total / self.count for name, total in self.sums.items()}

    def commit(self) -> dict[str, torch.Tensor]:
        """Blend the average since the last commit into the EMA, reset the sums, return the EMA."""
        averaged = self.average()
        if self.ema is None:
            self.ema = {name: value.clone() for name, value in averaged.items()}
        else:
            d = self.ema_decay
            self.ema = {name: d * self.ema[name] + (1 - d) * averaged[name] for name in averaged}
        for total in self.sums.values():
            total.zero_()
        self.count = 0
        return self.scores()

    def scores(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            raise RuntimeError("no committed scores yet: call commit() at a pruning step")
        return {name: value.clone() for name, value in self.ema.items()}

    def state_dict(self) -> dict:
        return {
            "kind": self.kind.value,
            "ema_decay": self.ema_decay,
            "sums": {k: v.clone() for k, v in self.sums.items()},
            "count": self.count,
            "ema": None if self.ema is None else {k: v.clone() for k, v in self.ema.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["sums"]) != set(self.sums):
            raise ValueError("importance state does not belong to this model's pruning space (dimension names differ)")
        self.kind = ScoreKind(state["kind"])
        self.ema_decay = state["ema_decay"]
        self.sums = {k: v.clone().double() for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self.ema = None if state["ema"] is None else {k: v.clone().double() for k, v in state["ema"].items()}
