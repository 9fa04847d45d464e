"""The machine a result was measured on: CPU, threads, GPU, library versions, the CPU kernel in use."""

from __future__ import annotations

import os
import platform

import torch

from hookmoe.kernels import cpu_gemm


def machine_info() -> dict:
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["cpu_gemm"] = cpu_gemm.describe()
    try:
        from hookmoe._version import __version__

        info["hookmoe"] = __version__
    except ImportError:
        pass
    return info
