"""What a run ran on: Python, the packages hmcl's results depend on, and the device.

``hmcl --version`` prints it (paste it into a bug report), and ``hmcl run`` keeps it in
``<run>/run.json``, so a scheduled retraining whose numbers moved can be told apart from one whose
packages did. Versions come from the installed distributions' metadata (no import); the device
line imports torch.
"""

from __future__ import annotations

import platform
from typing import Optional

# the distributions whose versions change what hmcl computes or can do
PACKAGES = ("torch", "transformers", "sentence-transformers", "accelerate", "peft", "datasets", "mteb",
            "huggingface-hub", "tokenizers", "numpy", "onnx", "onnxruntime", "faiss-cpu", "flash-attn")


def package_version(dist: str) -> Optional[str]:
    """The installed version of the distribution ``dist``, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def device_summary() -> str:
    """``cpu (N threads)``, or the GPUs: ``cuda 12.8: 2 x NVIDIA H100 80GB HBM3``."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        kinds = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
        return f"cuda {torch.version.cuda}: {kinds}"
    return f"cpu ({torch.get_num_threads()} threads)"


def environment() -> dict:
    """Python, platform, device and the versions of :data:`PACKAGES` (None: not installed)."""
    from hmcl_cli import __version__

    import torch

    packages = {name: package_version(name) for name in PACKAGES}
    packages["torch"] = torch.__version__  # with its build (+cu130, +cpu), which the metadata may leave out
    return {"hmcl": __version__, "python": platform.python_version(), "platform": platform.platform(terse=True),
            "device": device_summary(), "packages": packages}


def environment_lines(env: dict) -> list[str]:
    """``environment()`` as lines, the installed packages only."""
    lines = [f"hmcl {env['hmcl']}", f"python {env['python']} ({env['platform']})", f"device {env['device']}"]
    lines += [f"{name} {v}" for name, v in env["packages"].items() if v is not None]
    return lines


def available_memory() -> Optional[int]:
    """Bytes of host memory available to a new allocation now (Linux: ``MemAvailable``), or None
    where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
