"""What the evaluation loop counts and shows while it runs: image-tower passes, a progress bar."""

from __future__ import annotations

from typing import Dict

from torch import nn

from .rows import Row

STEMS = ("visual.conv1", "vision_model.embeddings.patch_embedding")  # open_clip; Hugging Face CLIP / SigLIP


def image_stem(model) -> "nn.Module | None":
    """The first layer every image passes once through (its image tower's stem), or None."""
    for path in STEMS:
        found = model
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.Module):
            return found
    return None


class PassCounter:
    """Counts images through each wrapped model's image tower (a forward hook on its stem)."""

    def __init__(self, adapters: Dict[str, nn.Module]):
        self.count = 0
        self.handles = []
        seen = set()
        for adapter in adapters.values():
            stem = image_stem(getattr(adapter, "model", None))
            if stem is not None and id(stem) not in seen:
                seen.add(id(stem))
                self.handles.append(stem.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output):
        self.count += int(inputs[0].shape[0])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def progress_postfix(rows: Dict[str, Row], attacked: bool) -> str:
    parts = []
    for row in rows.values():
        if not row.n:
            continue
        text = f"{row.adapter} {100 * row.clean_acc:.1f}"
        if attacked:
            text += f"/{100 * row.adv_acc:.1f}"
        parts.append(text)
    label = "clean/adv %" if attacked else "clean %"
    return f"{label}: " + " ".join(parts) if parts else ""


class _NoBar:
    def update(self, *_):
        pass

    def set_postfix_str(self, *_, **__):
        pass

    def set_description_str(self, *_, **__):
        pass

    def close(self):
        pass


def progress_bar(enabled: bool, total: int, description: str, unit: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, mininterval=0.5)
