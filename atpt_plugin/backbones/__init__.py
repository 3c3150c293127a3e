"""Model families behind one interface (base.py); importing this registers the built-ins."""
from .base import BACKBONES, Backbone, detect
from .openclip import OpenClipBackbone
from .timm_vit import TimmCnnBackbone, TimmVitBackbone

__all__ = ["BACKBONES", "Backbone", "detect", "OpenClipBackbone", "TimmCnnBackbone", "TimmVitBackbone"]
