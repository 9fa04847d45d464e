"""Token blocks: documents tokenised, packed into ``[n, block_len]`` blocks for calibration and evaluation, cached on
disk; batching helpers."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from hookmoe.data.builtin import _dedupe
from hookmoe.data.sources import TOKEN_OVERSAMPLE, _FORMAT_VERSION, _as_int, _resolve, _rng
from hookmoe.data.splits import _check_split, _in_streamed_split, _split_error, split_documents
from hookmoe.errors import DataError


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


_PROBE = "Hello world! The quick brown fox, 1234 jumps; déjà vu, 東京, ∑x². def f(x):\n\treturn x  # ok"


def needs_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether blocks for this tokenizer should start with BOS: it has one and its own call adds it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("Hello world")["input_ids"]
    return len(ids) > 0 and int(ids[0]) == int(bos)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of what decides a tokenizer's output (class, vocabulary size, ids of a probe, name)."""
    plain = list(map(int, tokenizer(_PROBE, add_special_tokens=False)["input_ids"]))
    default = list(map(int, tokenizer(_PROBE)["input_ids"]))
    facts = [
        type(tokenizer).__name__,
        len(tokenizer),
        getattr(tokenizer, "vocab_size", None),
        getattr(tokenizer, "name_or_path", ""),
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        plain,
        default,
    ]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def _tokenize_stream(
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[str],
    target: int,
    progress: Any = None,
) -> np.ndarray:
    """Token ids of documents, EOS after each, until at least ``target`` tokens (or the documents run out)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [int(eos)] if eos is not None else []
    pieces: list[np.ndarray] = []
    total = 0
    chars_seen, tokens_seen = 0, 0
    batch: list[str] = []
    batch_chars = 0

    def flush() -> None:
        nonlocal total, chars_seen, tokens_seen, batch, batch_chars
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for text, ids in zip(batch, encoded):
            array = np.asarray(list(ids) + tail, dtype=np.int64)
            pieces.append(array)
            total += len(array)
            chars_seen += len(text)
            tokens_seen += len(array)
        if progress is not None:
            progress(min(total, target))
        batch, batch_chars = [], 0

    for document in documents:
        batch.append(document)
        batch_chars += len(document)
        # Until measured, assume 1 character per token (byte-level), so the first batch cannot overshoot.
        chars_per_token = chars_seen / tokens_seen if tokens_seen else 1.0
        wanted_chars = (target - total) * chars_per_token * 1.1
        if len(batch) >= 512 or batch_chars >= min(max(wanted_chars, 1), 2_000_000):
            flush()
            if total >= target:
                break
    if batch:
        flush()
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def default_cache_dir() -> Path:
    """``$HOOKMOE_CACHE`` if set, else ``~/.cache/hookmoe``."""
    return Path(os.environ.get("HOOKMOE_CACHE") or Path.home() / ".cache" / "hookmoe").expanduser()


def _load_cached(path: Path, key: str, shape: tuple[int, int]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("hookmoe_key") != key:
                return None
            blocks = handle.get_tensor("blocks")
    except Exception:  # a damaged file is recomputed and overwritten
        return None
    if tuple(blocks.shape) != shape or blocks.dtype != torch.int64:
        return None
    return blocks


def _save_cached(path: Path, key: str, blocks: torch.Tensor) -> None:
    from safetensors.torch import save_file

    # Written under a unique name next to the target, then renamed: readers never see half a file.
    temporary: str | None = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"blocks": blocks.contiguous()}, temporary, metadata={"hookmoe_key": key})
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        warnings.warn(f"Could not write the data cache {path} ({error}); continuing without it.", stacklevel=3)
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def _progress_bar(enabled: bool, description: str, total: int) -> Any:
    """A context manager yielding ``update(completed)``; a no-op when disabled."""
    import contextlib

    from hookmoe.progress import wanted

    if not wanted(enabled):  # asked for, a terminal, and not HOOKMOE_PROGRESS=0 (like every other bar)
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar() -> Iterator[Any]:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("{task.description}", markup=False),  # the description holds the user's source
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,} tokens"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True)) as progress:
            task = progress.add_task(description, total=total)
            yield lambda completed: progress.update(task, completed=completed)

    return bar()


def make_blocks(
    tokenizer: PreTrainedTokenizerBase,
    src: str,
    n_blocks: int,
    block_len: int,
    *,
    seed: int = 0,
    split: str = "train",
    heldout_fraction: float = 0.1,
    add_bos: bool | None = None,
    cache_dir: str | Path | None | bool = None,
    text_field: str = "text",
    progress: bool = False,
) -> torch.Tensor:
    """``n_blocks`` token windows of length ``block_len`` from ``src``, as a ``[n_blocks, block_len]`` int64 tensor.

    Documents of ``split`` are visited in an order drawn with ``seed`` (streamed sources: the
    dataset's seeded shuffle buffer), tokenised without special tokens with EOS appended to each,
    and concatenated until :data:`TOKEN_OVERSAMPLE` times the needed tokens are held. The stream is
    cut into non-overlapping windows of ``block_len`` (``block_len - 1`` with BOS), and ``n_blocks``
    distinct windows are drawn with ``seed``. ``add_bos=None`` prepends BOS iff :func:`needs_bos`.

    ``cache_dir=None`` caches under :func:`default_cache_dir`; ``False`` disables the cache.
    """
    n_blocks = _as_int(n_blocks, "n_blocks", 1)
    block_len = _as_int(block_len, "block_len", 1)
    seed = _as_int(seed, "seed")
    fraction = _check_split(split, heldout_fraction)
    source = _resolve(src, text_field)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos = needs_bos(tokenizer) if add_bos is None else bool(add_bos)
    if bos and bos_id is None:
        raise DataError("add_bos=True, but this tokenizer has no BOS token.")
    window = block_len - int(bos)
    if window < 1:
        raise DataError("block_len must be at least 2 when every block starts with BOS.")

    cache_path = key = None
    if cache_dir is not False:
        facts = {
            "format": _FORMAT_VERSION,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "source": source.fingerprint(),
            "n_blocks": n_blocks,
            "block_len": block_len,
            "seed": seed,
            "split": split,
            "heldout_fraction": fraction,
            "add_bos": bos,
            "text_field": text_field,
        }
        key = json.dumps(facts, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        folder = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir).expanduser()
        cache_path = folder / "blocks" / f"blocks-{n_blocks}x{block_len}-{digest}.safetensors"
        cached = _load_cached(cache_path, key, (n_blocks, block_len))
        if cached is not None:
            return cached

    if source.streamed:
        documents: Iterable[str] = (
            text for text in source.documents(shuffle_seed=seed) if _in_streamed_split(text, split, fraction)
        )
    else:
        all_documents = list(source.documents())
        if not all_documents:
            raise DataError(f"The data source '{src}' contains no text.")
        selected = split_documents(all_documents, split, fraction)
        if not selected:
            raise _split_error(src, split, len(_dedupe(all_documents)), fraction)
        order = _rng(seed, "documents").permutation(len(selected))
        documents = (selected[i] for i in order)

    needed = n_blocks * window
    with _progress_bar(progress, f"Tokenising {src} ({split})", TOKEN_OVERSAMPLE * needed) as update:
        stream = _tokenize_stream(tokenizer, documents, TOKEN_OVERSAMPLE * needed, update)
    n_windows = len(stream) // window
    if n_windows < n_blocks:
        if len(stream) == 0:  # a streamed source whose split held nothing
            raise DataError(f"The {split} split of '{src}' yielded no text.")
        raise DataError(
            f"The {split} split of '{src}' holds only {len(stream):,} tokens ({n_windows} windows of {window}), "
            f"but {n_blocks} blocks of {block_len} tokens need {needed:,} tokens of text; ask for fewer or shorter blocks, "
            "or use more data."
        )
    chosen = _rng(seed, "windows").choice(n_windows, size=n_blocks, replace=False)
    windows = torch.from_numpy(stream[: n_windows * window].reshape(n_windows, window)[chosen].copy())
    if bos:
        windows = torch.cat([torch.full((n_blocks, 1), int(bos_id), dtype=torch.int64), windows], dim=1)
    if cache_path is not None and key is not None:
        _save_cached(cache_path, key, windows)
    return windows


def num_batches(n_items: int, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches one epoch over ``n_items`` rows gives."""
    batch_size = _as_int(batch_size, "batch_size", 1)
    return n_items // batch_size if drop_last else -(-n_items // batch_size)


def iter_batches(
    blocks: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    start: int = 0,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """One epoch of ``[b, T]`` batches of ``blocks`` rows (the last may be smaller unless ``drop_last``).

    With ``shuffle`` the row order is a permutation drawn from ``seed`` (use e.g. ``seed + epoch``
    for later epochs). ``start`` is the index of the first batch to yield, to resume an epoch.
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
        raise DataError("blocks must be a 2-D tensor of token ids [n_blocks, block_len].")
    total = num_batches(blocks.shape[0], batch_size, drop_last=drop_last)
    start = _as_int(start, "start", 0)
    if start > total:
        raise DataError(f"Cannot start at batch {start}: an epoch of {blocks.shape[0]} rows has {total} batches.")
    seed = _as_int(seed, "seed")
    if shuffle:
        order = torch.from_numpy(_rng(seed, "batches").permutation(blocks.shape[0]))
    else:
        order = torch.arange(blocks.shape[0])
    order = order.to(blocks.device)
    for index in range(start, total):
        yield blocks.index_select(0, order[index * batch_size : (index + 1) * batch_size])
