"""Evaluation harness for MAGE: front metrics (``metrics``) and quadratic theory (``theory``)."""

from evaluation.metrics import (
    controllability,
    default_reference_point,
    front_length,
    hypervolume,
    inner_product,
    non_dominated,
    spacing,
    sparsity,
    summarise_front,
)

__all__ = [
    "controllability",
    "default_reference_point",
    "front_length",
    "hypervolume",
    "inner_product",
    "non_dominated",
    "sparsity",
    "spacing",
    "summarise_front",
]
