"""First-order Taylor importance from gate gradients, averaged over iterations and EMA'd across steps.

A gate g multiplies a unit's activations a, so dL/dg (at g = 1) = sum over the unit's activations of
a * dL/da — the first-order estimate of the loss change when the unit is removed. The paper scores
CNN channels with |.| of that quantity (the BN Taylor score |gamma dL/dgamma + beta dL/dbeta|) and ViT
units with its square; both are offered. Scores are summed over optimizer steps (gradient accumulation
has already summed the micro-batches into the gate's .grad), averaged when a pruning step reads them,
and blended across pruning steps with an exponential moving average.
"""

from __future__ import annotations

from enum import Enum

import torch

from ..adapters import GateSet


class ScoreKind(str, Enum):
    ABS = "abs"  # |dL/dg|  (paper: CNN channels)
    SQUARE = "square"  # (dL/dg)^2  (paper: ViT units)


class ImportanceAccumulator:
    """Collects per-unit scores for every dimension of a GateSet.

    Call :meth:`accumulate` once per optimizer step (after backward); :meth:`commit` at a pruning
    step averages the steps since the last one into the EMA and returns it as CPU float64 tensors; :meth:`state_dict`
    makes the accumulator resumable from a checkpoint.
    """

    def __init__(self, gates: GateSet, kind: ScoreKind | str = ScoreKind.SQUARE, ema_decay: float = 0.9):
        self.gates = gates
        self.kind = ScoreKind(kind)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.sums = {name: torch.zeros(g.numel(), dtype=torch.float64) for name, g in gates.dims.items()}
        self.count = 0
        self.ema: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def accumulate(self, grad_scale: float = 1.0, reduce=None) -> bool:
        """Add this step's gate gradients (divided by ``grad_scale``, e.g. an fp16 loss scale) and clear them.

        ``reduce`` maps {dimension: gradient} to its mean over data-parallel ranks. Gradients are reduced
        *before* |.| or (.)^2, as DDP averages parameter gradients, so every rank gets the scores one
        process would compute on the same global batch. Returns False (and adds nothing) for a step whose
        gradients are not finite (an fp16 overflow step that the optimizer skips too).
        """
        grads = {
            name: (gate.grad.detach().double().cpu() / grad_scale) if gate.grad is not None else torch.zeros(gate.numel(), dtype=torch.float64)
            for name, gate in self.gates.dims.items()
        }
        self.gates.zero_grad()
        if reduce is not None:
            grads = reduce(grads)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            return False
        for name, grad in grads.items():
            self.sums[name] += grad.abs() if self.kind is ScoreKind.ABS else grad.square()
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
