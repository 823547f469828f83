"""Segmentation fine-tuning with few labels: supervised, mean teacher, CORN (``tcm-finetune``)."""

from .config import SEMI_MODES, FinetuneConfig
from .data import SegmentationSplit, build_split
from .losses import (DynamicFeaturePool, ccm_loss, consistency_loss, ema_update, sigmoid_rampup,
                     similarity_consistency_loss, supervised_loss)
from .model import SegmentationNet, load_pretrained_encoder
from .trainer import FineTuner, finetune

__all__ = ["SEMI_MODES", "DynamicFeaturePool", "FineTuner", "FinetuneConfig", "SegmentationNet", "SegmentationSplit",
           "build_split", "ccm_loss", "consistency_loss", "ema_update", "finetune", "load_pretrained_encoder",
           "sigmoid_rampup", "similarity_consistency_loss", "supervised_loss"]
