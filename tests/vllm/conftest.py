"""vLLM tests: collected only where vLLM is importable (``make test-vllm`` builds ``.venv-vllm``)."""

import importlib.util
import os

def _vllm_installed() -> bool:
    # a real package, not this directory seen as a namespace package "vllm" through tests/ on sys.path
    spec = importlib.util.find_spec("vllm")
    return spec is not None and str(spec.origin or "").endswith("__init__.py")


if not _vllm_installed():
    # the main environment has no vLLM: skip this directory without importing anything from it
    collect_ignore_glob = ["test_*.py"]
else:
    # vLLM's CPU backend, in this process (engine core in-process: faster start, model inspectable)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
