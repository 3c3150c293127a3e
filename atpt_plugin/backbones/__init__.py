"""Model families behind one interface (base.py); importing this registers the built-ins.

Registration order is detection order among the built-ins: the catch-all `timm_cnn` (any
other timm model) comes after the timm token transformers it must not shadow.
"""

from .base import BACKBONES, Backbone, detect
from .hf_clip import HfClipBackbone
from .hf_siglip import HfSiglipBackbone
from .openclip import OpenClipBackbone
from .timm_cnn import TimmCnnBackbone
from .timm_eva import TimmEvaBackbone
from .timm_vit import TimmVitBackbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "detect",
    "HfClipBackbone",
    "HfSiglipBackbone",
    "OpenClipBackbone",
    "TimmCnnBackbone",
    "TimmEvaBackbone",
    "TimmVitBackbone",
]
