"""Downstream evaluation of pretrained encoders on the embedded data, and the methods report."""

from .tasks import brain_lobe_task, chest_organ_task
from .probe import evaluate_encoder

__all__ = ["brain_lobe_task", "chest_organ_task", "evaluate_encoder"]
