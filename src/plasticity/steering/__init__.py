"""Contrast prompts, activation capture, direction readers, control hooks, evaluation."""

from plasticity.steering.hooks import capture, hook_name, steer
from plasticity.steering.prompts import ContrastPair, contrast_pairs
from plasticity.steering.readers import detection_accuracy, mean_difference

__all__ = [
    "capture",
    "hook_name",
    "steer",
    "ContrastPair",
    "contrast_pairs",
    "detection_accuracy",
    "mean_difference",
]
