"""The contract between the trainer and a pretraining method, and the registry of methods by name.

A method owns what differs between SparK, TCM, AnatoMask and AMLP: how the mask is chosen,
which extra modules it trains (heads) or keeps (an EMA teacher), and its loss. The trainer
owns everything else (data, device, precision, compile, optimiser, checkpoints) and calls a
method only through :class:`Method`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..trainer import Trainer

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method: <cls.name>``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({_REGISTRY[cls.name].__module__} and "
                         f"{cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered class of method ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"config: method must be one of {tuple(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(_REGISTRY)


class Method:
    """One pretraining method; subclasses are registered with :func:`register`.

    Built by the trainer once its model sits on its device; ``heads`` (a ModuleDict on that
    device) are trained with the model and checkpointed under their own names, so a
    checkpoint carries only the modules its method uses.
    """

    name: ClassVar[str]
    needs_labels: ClassVar[bool] = False  # only scans with label maps (text prompts are matched to labels)
    needs_saliency: ClassVar[bool] = False  # the stream draws a prompt's saliency map per item
    preview_strategy: ClassVar[str] = "uniform"  # sample_mask strategy of the images written during training
    default_mask_ratio: ClassVar[float] = 0.6  # the masking ratio when the config's mask_ratio is null

    @classmethod
    def ratio_at(cls, cfg, step: int) -> float:
        """The overall masking ratio at ``step``: ``cfg.mask_ratio`` if set, else the method's default."""
        return cfg.mask_ratio if cfg.mask_ratio is not None else cls.default_mask_ratio

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.heads = nn.ModuleDict(self.build_heads(trainer.model.encoder.channels[-1])).to(trainer.device)
        # DDP averages the heads' gradients like the model's; the unwrapped heads are checkpointed.
        self.head_nets = {name: trainer.distribute(head) for name, head in self.heads.items()}

    def build_heads(self, width: int) -> dict[str, nn.Module]:
        """Extra trainable modules on the encoder's deepest features (``width`` channels)."""
        return {}

    def loss(self, images: torch.Tensor, saliency: torch.Tensor, step: int, draw: int) -> dict[str, torch.Tensor]:
        """The loss of one (micro-)batch: ``{"loss", "recon", "contrastive", "ccl"}`` 0-D tensors.

        images, saliency: [B, 1, *S] on the trainer's device. ``step`` is the optimiser step
        (schedules: mask ratio, curricula); ``draw`` numbers the micro-batch across the run
        (step * grad_accum_steps + k) and seeds its masks, so every micro-batch gets its own.
        Runs under the trainer's autocast.
        """
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each applied optimiser step (e.g. an EMA update)."""

    def extra_state(self) -> dict[str, nn.Module]:
        """Non-trained modules to checkpoint besides the heads (e.g. a teacher)."""
        return {}

    def state_dict(self) -> dict[str, dict]:
        """The checkpoint entries of this method: one state dict per head and extra module."""
        return {name: m.state_dict() for name, m in {**dict(self.heads.items()), **self.extra_state()}.items()}

    def load_state_dict(self, state: dict) -> None:
        """Load the entries :meth:`state_dict` wrote; entries a checkpoint lacks keep their fresh values
        (a checkpoint written before a head existed), and other methods' entries are ignored."""
        for name, module in {**dict(self.heads.items()), **self.extra_state()}.items():
            if state.get(name) is not None:
                module.load_state_dict(state[name])

    # helpers shared by the methods

    def zero(self) -> torch.Tensor:
        """The 0-D float32 zero logged for a term a method does not have."""
        return torch.zeros((), dtype=torch.float32, device=self.trainer.device)

    def recon_only(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        zero = self.zero()
        return {"loss": loss, "recon": loss, "contrastive": zero, "ccl": zero}
