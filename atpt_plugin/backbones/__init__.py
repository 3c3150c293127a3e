"""Model families behind one interface (base.py); importing this registers the built-ins.

Detection asks installed plugins first, then the built-ins; a catch-all family (`fallback =
True`, e.g. `timm_cnn` for any other timm model) is asked last, whatever the import order.
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
