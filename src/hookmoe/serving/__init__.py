"""Serving hookmoe models in inference engines.

* :func:`export_for_engine` — ``hookmoe export --target vllm|transformers``: a plain checkpoint for a
  uniform ``topk:K`` plan, or a checkpoint naming hookmoe's model classes that carries the plan and
  the Hook (see :mod:`hookmoe.serving.export`).
* :func:`read_spec` — the per-layer routing and Hook of an export, checked against the model.
* :mod:`hookmoe.serving.vllm_plugin` — the vLLM plugin (entry point ``vllm.general_plugins``); it
  imports vLLM only when vLLM calls it.
"""

from .export import ExportResult, export_for_engine, uniform_k
from .spec import ServingSpec, read_spec

__all__ = ["export_for_engine", "ExportResult", "uniform_k", "read_spec", "ServingSpec"]
