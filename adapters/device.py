"""`--device` as users type it: `auto`, `cpu`, `cuda` (this process's GPU: cuda:LOCAL_RANK), `cuda:N`.

`torch.cuda.set_device` needs an index, and a CUDA device on a machine without CUDA fails
deep inside torch; both are settled here, before any model is built, with one message
that names the value and what to type instead.
"""

from __future__ import annotations

import torch


def resolve_device(text: str, local_rank: int = 0) -> torch.device:
    """The torch device for `--device text` in the process of local rank `local_rank` (made current if CUDA)."""
    raw = str(text).strip()
    if raw.lower() == "auto":
        raw = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(raw)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {text!r} is not a device: use auto, cpu, cuda (this process's GPU) or cuda:N"
        ) from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {text}: this machine has no usable CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu, or --device auto to take a GPU only where there is one"
        )
    count = torch.cuda.device_count()
    index = local_rank if device.index is None else device.index
    if index >= count:
        spelled = f"cuda:{index}" if device.index is not None else f"cuda (cuda:{index} for local rank {local_rank})"
        raise ValueError(
            f"--device {spelled}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
            "use one of those, or --device cuda to take the process's own (cuda:LOCAL_RANK)"
        )
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device
