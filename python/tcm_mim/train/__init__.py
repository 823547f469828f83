"""Reference pretraining: configuration, data stream, methods (spark, tcm, anatomask, amlp), trainer, CLI."""

from .config import ConfigError, PretrainConfig, load_config
from .trainer import Trainer

__all__ = ["ConfigError", "PretrainConfig", "Trainer", "load_config"]
