"""Importance scores per unit of every dimension, accumulated from parameter (or gate) gradients during training."""

from .taylor import ImportanceAccumulator, ScoreKind

__all__ = ["ImportanceAccumulator", "ScoreKind"]
