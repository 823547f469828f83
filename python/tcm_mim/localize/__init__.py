"""Prompt -> saliency: the localizers and score providers that drive differentiated masking."""

from .atlas import ATLASES, AtlasLocalizer, AtlasRegistrationError, Registration
from .base import Localizer, mask_to_saliency
from .cache import SaliencyCache, content_digest
from .clipseg import CLIPSegLocalizer
from .guides import ClusterGuide, ReconstructionGuide
from .label_text import LabelTextLocalizer, Match

__all__ = ["ATLASES", "AtlasLocalizer", "AtlasRegistrationError", "CLIPSegLocalizer", "ClusterGuide",
           "LabelTextLocalizer", "Localizer", "Match", "ReconstructionGuide", "Registration", "SaliencyCache",
           "content_digest", "mask_to_saliency"]
