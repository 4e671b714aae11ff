"""What a benchmark ran on (the device in words, the versions that matter), and whether this machine may
use the network."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device | str | None = None) -> str:
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import diffusers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "fastdiff": __version__}


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def offline() -> bool:
    """HF_HUB_OFFLINE or FASTDIFF_OFFLINE set (to anything but 0): nothing may be downloaded."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "FASTDIFF_OFFLINE"))


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
             enabled: bool = True):
    """A tqdm bar on stderr for a long loop: off when ``enabled`` is false (``--quiet``) and when stderr is not a
    terminal (tqdm's ``disable=None``), so logs and captured output never fill with bars."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if enabled else True, dynamic_ncols=True)
