"""A-TPT and its baselines as test-time adapters for open_clip (and timm) models."""

from .adapter import TestTimeAdapter
from .api import ENTRY_POINT_GROUP, Adapter, list_adapters, load_adapter
from .config import AdapterConfig

__all__ = ["Adapter", "AdapterConfig", "TestTimeAdapter", "ENTRY_POINT_GROUP", "list_adapters", "load_adapter"]
__version__ = "0.1.0"
