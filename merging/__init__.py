"""Model merging for MAGE: coefficient maths (Stage 1, Bone Soup) and exact LoRA merging."""

from merging.coefficients import (
    PreferenceError,
    bone_soup_coefficients,
    circulant_matrix,
    normalise_preference,
    solve_lambda,
)
from merging.registry import MERGE_METHODS, MergeMethod, get_merge_method

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "PreferenceError",
    "bone_soup_coefficients",
    "circulant_matrix",
    "get_merge_method",
    "normalise_preference",
    "solve_lambda",
]
