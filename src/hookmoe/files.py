"""Writing files without ever leaving a half-written one: the one JSON encoder and the atomic writers.

Every artifact, report and JSON hookmoe writes goes through :func:`atomic_write_text` / :func:`write_json`: the bytes
go to a temporary sibling that is renamed over the target only once complete, so an interrupted or failed run never
leaves a truncated file where a good one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def json_default(o: Any) -> Any:
    """JSON for the values hookmoe results hold: config objects, paths, dtypes, tensors, sets and tuples."""
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    try:
        import torch

        if isinstance(o, torch.dtype):
            return str(o).replace("torch.", "")
        if isinstance(o, torch.Tensor):
            return o.item() if o.numel() == 1 else o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=json_default) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    return atomic_write_text(path, to_json(obj))
