"""Text sources: the builtin offline corpus, hub datasets (``c4``, ``math``, ``hf:ID``) and local files or folders,
resolved from a source string into documents."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import operator
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from hookmoe.data.builtin import _builtin_documents, _builtin_fingerprint
from hookmoe.errors import DataError

if TYPE_CHECKING:
    pass




BUILTIN_SOURCES = ("builtin", "builtin:pydoc", "builtin:wiki", "builtin:news")


SPLITS = ("train", "heldout", "all")


TEXT_SUFFIXES = (".txt", ".md", ".text")


JSONL_SUFFIXES = (".jsonl", ".ndjson")


JSON_SUFFIXES = (".json",)


PARQUET_SUFFIXES = (".parquet",)


#: A streamed source read by :func:`load_documents` without ``max_docs`` stops here (with a warning).
MAX_STREAMED_DOCS = 100_000


#: :func:`make_blocks` stops tokenising once it holds this many times the tokens it needs.
TOKEN_OVERSAMPLE = 4


#: Bump when the corpus cleaning or the packing changes, so old cache files are not reused.
_FORMAT_VERSION = 1


_HUB_HINT = "install it with `pip install hookmoe[hub]` (or `pip install datasets`)"


def _rng(seed: int, purpose: str) -> np.random.RandomState:
    """A generator for one purpose; ``RandomState`` streams are frozen by NumPy's policy."""
    digest = hashlib.blake2b(f"hookmoe:{purpose}:{seed}".encode(), digest_size=16).digest()
    return np.random.RandomState(np.frombuffer(digest, dtype="<u4"))


def _as_int(value: Any, name: str, minimum: int | None = None) -> int:
    name = "--" + name.replace("_", "-")  # messages name the flag (--n-blocks), not the Python parameter
    if isinstance(value, bool):
        raise DataError(f"{name} must be an integer, not {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise DataError(f"{name} must be an integer, not {value!r}.") from None
    if minimum is not None and number < minimum:
        raise DataError(f"{name} must be at least {minimum}, got {number}.")
    return number


@dataclass(frozen=True)
class _HubSpec:
    """A streamed hub dataset: several configs are read round-robin; text = fields joined by newlines."""

    dataset: str
    configs: tuple[str | None, ...]
    split: str
    fields: tuple[str, ...]
    fallback: _HubSpec | None = None

    def describe(self) -> str:
        named = [c for c in self.configs if c]
        configs = ",".join(named) if len(named) <= 2 else f"{len(named)} configs"
        return f"{self.dataset}" + (f" ({configs})" if configs else "") + f" split {self.split}"


_MATH_CONFIGS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def _named_hub_spec(name: str, split: str | None) -> _HubSpec:
    if name == "c4":
        return _HubSpec("allenai/c4", ("en",), split or "train", ("text",))
    # math: EleutherAI's copy of MATH by subject, else the original (taken down in places).
    fallback = _HubSpec("hendrycks/competition_math", (None,), split or "train", ("problem", "solution"))
    return _HubSpec("EleutherAI/hendrycks_math", _MATH_CONFIGS, split or "train", ("problem", "solution"), fallback)


def _parse_hf(src: str, text_field: str) -> _HubSpec:
    body = src[3:]
    body, _, split = body.partition("@")
    dataset, _, config = body.partition(":")
    if not dataset or (src.count("@") and not split) or ":" in config:
        raise DataError(f"'{src}' is not a hub source; write hf:DATASET[:CONFIG][@SPLIT], e.g. hf:allenai/c4:en@train.")
    return _HubSpec(dataset, (config or None,), split or "train", (text_field,))


def _import_datasets() -> Any:
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise DataError(f"Hub data sources need the `datasets` package; {_HUB_HINT}.") from None


def _row_text(row: Any, spec: _HubSpec) -> str:
    if not isinstance(row, dict):
        raise DataError(f"Hub dataset {spec.dataset} yields {type(row).__name__} rows, not records with text fields.")
    pieces = []
    for name in spec.fields:
        value = row.get(name)
        if not isinstance(value, str):
            fields = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(
                f"Hub dataset {spec.dataset} has no text field '{name}' (its fields: {fields}); "
                "choose another text field."
            )
        pieces.append(value.strip())
    return "\n".join(pieces).strip()


def _iter_hub(spec: _HubSpec, shuffle_seed: int | None) -> Iterator[str]:
    from hookmoe.compat import hub_offline_reason

    datasets = _import_datasets()  # a missing package first: its install hint is the more useful line
    reason = hub_offline_reason()
    if reason is not None:  # one line now, not minutes of retries
        raise DataError(f"Hub dataset {spec.dataset} is streamed from the hub, but {reason}; use builtin or a local "
                        "text file or folder.")
    yielded = False
    try:
        iterators = []
        for config in spec.configs:
            stream = datasets.load_dataset(spec.dataset, config, split=spec.split, streaming=True)
            if shuffle_seed is not None and hasattr(stream, "shuffle"):
                stream = stream.shuffle(seed=shuffle_seed % 2**32, buffer_size=1_000)
            iterators.append(iter(stream))
        while iterators:
            alive = []
            for iterator in iterators:
                try:
                    row = next(iterator)
                except StopIteration:
                    continue
                alive.append(iterator)
                text = _row_text(row, spec)
                if text:
                    yielded = True
                    yield text
            iterators = alive
    except (DataError, GeneratorExit):
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
        if spec.fallback is None or yielded:
            raise DataError(f"Could not stream hub dataset {spec.describe()} ({reason}).") from error
        fallback_failed: DataError | None = None
        try:
            yield from _iter_hub(spec.fallback, shuffle_seed)
        except DataError as fallback_error:
            fallback_failed = fallback_error
        if fallback_failed is not None:
            raise DataError(
                f"Could not stream hub dataset {spec.describe()} ({reason}), and the fallback failed too: "
                f"{str(fallback_failed)[0].lower()}{str(fallback_failed)[1:]}"
            ) from error


def _file_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if not suffixes:
        return None
    last = suffixes[-1]
    if last == ".gz" and len(suffixes) >= 2 and suffixes[-2] in TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES:
        last = suffixes[-2]
    for kind, group in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("json", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if last in group:
            return kind
    return None


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if _file_kind(path) is None:
            raise DataError(f"{path} is not a supported data file; use .txt, .md, .jsonl, .json or .parquet (optionally .gz).")
        return [path]
    files = []
    for candidate in path.rglob("*"):
        relative = candidate.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if candidate.is_file() and _file_kind(candidate) is not None:
            files.append(candidate)
    if not files:
        raise DataError(f"Folder {path} holds no .txt, .md, .jsonl, .json or .parquet files.")
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _open_text(path: Path) -> IO[str]:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _record_text(record: Any, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if text_field not in record:
            fields = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"{where} has no '{text_field}' field (its fields: {fields}); choose another text field.")
        value = record[text_field]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{text_field}' holds {type(value).__name__}, not text.")
        return value
    raise DataError(f"{where} is {type(record).__name__}, expected an object with a '{text_field}' field or a string.")


def _read_parquet_column(path: Path, text_field: str) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path} has no '{text_field}' column (its columns: {', '.join(table.column_names)}).")
        return table.column(text_field).to_pylist()
    try:
        import pandas
    except ImportError:
        pandas = None
    if pandas is not None:
        try:
            frame = pandas.read_parquet(path)
        except ImportError:
            pass
        else:
            if text_field not in frame.columns:
                raise DataError(f"{path} has no '{text_field}' column (its columns: {', '.join(map(str, frame.columns))}).")
            return frame[text_field].tolist()
    raise DataError(f"Reading {path.name} needs pyarrow; install it with `pip install pyarrow`.")


def _check_text(text: str, path: Path) -> None:
    """Refuse binary data read as text: NUL bytes or many undecodable bytes (shown as U+FFFD) in its first 64 kB."""
    head = text[:65536]
    if not head:
        return
    bad = head.count("\ufffd") + head.count("\x00")
    if "\x00" in head or bad > max(8, len(head) // 100):
        raise DataError(f"{path} is not text (binary or not UTF-8); give a UTF-8 .txt/.jsonl/.parquet file.")


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    kind = _file_kind(path)
    if kind == "text":
        with _open_text(path) as handle:
            text = handle.read().replace("\r\n", "\n")
        _check_text(text, path)
        yield from (doc.strip() for doc in re.split(r"\n[ \t]*\n", text))
    elif kind == "jsonl":
        for number, record in jsonl_records(path):
            yield _record_text(record, text_field, f"{path}, line {number}").strip()
    elif kind == "json":
        with _open_text(path) as handle:
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
        if not isinstance(records, list):
            raise DataError(f"{path} must hold a JSON list of objects or strings (for one object per line, use .jsonl).")
        for number, record in enumerate(records):
            yield _record_text(record, text_field, f"{path}, item {number}").strip()
    elif kind == "parquet":
        for number, value in enumerate(_read_parquet_column(path, text_field)):
            yield _record_text(value, text_field, f"{path}, row {number}").strip() if value is not None else ""


def _local_fingerprint(files: Sequence[Path]) -> list[list[Any]]:
    """Path and a SHA-256 of the bytes of every file: a replaced file (even of the same size and time) never reuses
    stale cached tokens."""
    return [[str(file.resolve()), _content_hash(file)] for file in files]


_HASHES: dict[tuple, str] = {}  # within one process: (path, size, mtime, ctime, inode) -> content hash


def _content_hash(file: Path) -> str:
    try:
        st = file.stat()
        memo = (str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if memo in _HASHES:
            return _HASHES[memo]
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"Cannot read {file}: {e.strerror or type(e).__name__}.") from None
    _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


@dataclass(frozen=True)
class _Source:
    """A resolved ``src`` string: exactly one of ``builtin``, ``hub`` or ``files`` is set."""

    src: str
    text_field: str = "text"
    builtin: str | None = None
    hub: _HubSpec | None = None
    files: tuple[Path, ...] = ()

    @property
    def streamed(self) -> bool:
        return self.hub is not None

    def documents(self, *, shuffle_seed: int | None = None) -> Iterator[str]:
        """Non-empty, stripped documents in source order (hub: a seeded shuffle buffer when given a seed)."""
        if self.builtin is not None:
            texts: Iterable[str] = _builtin_documents(self.builtin)
        elif self.hub is not None:
            texts = _iter_hub(self.hub, shuffle_seed)
        else:
            texts = itertools.chain.from_iterable(_iter_file(file, self.text_field) for file in self.files)
        return (stripped for stripped in (text.strip() for text in texts) if stripped)

    def fingerprint(self) -> dict[str, Any]:
        """What determines this source's documents, for cache keys."""
        if self.builtin is not None:
            return _builtin_fingerprint(self.builtin)
        if self.hub is not None:
            return {"hub": [self.hub.dataset, list(self.hub.configs), self.hub.split, list(self.hub.fields)]}
        return {"files": _local_fingerprint(self.files), "text_field": self.text_field}


def _looks_like_path(src: str) -> bool:
    return (
        "/" in src
        or "\\" in src
        or src.startswith((".", "~"))
        or _file_kind(Path(src)) is not None
    )


def _resolve(src: str, text_field: str = "text") -> _Source:
    """Turn a source string into a :class:`_Source`, or raise :class:`DataError`."""
    if not isinstance(src, str) or not src.strip():
        raise DataError("The data source is empty; use builtin, c4, math, hf:DATASET or a path to a text file or folder.")
    if not isinstance(text_field, str) or not text_field:
        raise DataError("The text field must be a non-empty field name such as 'text'.")
    src = src.strip()
    if src in BUILTIN_SOURCES:
        return _Source(src, text_field, builtin=src)
    if src.startswith("builtin:"):
        raise DataError(f"Unknown built-in corpus '{src}'; choose one of {', '.join(BUILTIN_SOURCES)}.")
    name, _, split = src.partition("@")
    if name in ("c4", "math"):
        if "@" in src and not split:
            raise DataError(f"'{src}' names no split after '@'; write e.g. {name}@train.")
        return _Source(src, text_field, hub=_named_hub_spec(name, split or None))
    if src.startswith("hf:"):
        return _Source(src, text_field, hub=_parse_hf(src, text_field))
    path = Path(src).expanduser()
    if path.exists():
        return _Source(src, text_field, files=tuple(_local_files(path)))
    if _looks_like_path(src):
        raise DataError(f"Data file or folder not found: {src}.")
    raise DataError(
        f"Unknown data source '{src}'; use builtin, builtin:pydoc, builtin:wiki, builtin:news, c4, math, "
        "hf:DATASET[:CONFIG][@SPLIT], or a path to a .txt/.jsonl/.json/.parquet file or folder."
    )


def iter_documents(src: str, *, text_field: str = "text", max_docs: int | None = None) -> Iterator[str]:
    """Documents of ``src`` lazily, in source order, at most ``max_docs`` (streamed sources stop there).

    Raises :class:`DataError` at call time for an unknown source or missing file, and while
    iterating for unreadable records.
    """
    source = _resolve(src, text_field)
    if max_docs is not None:
        max_docs = _as_int(max_docs, "max_docs", 1)
    return itertools.islice(source.documents(), max_docs)


def load_documents(src: str, *, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """All documents of ``src`` (non-empty, stripped strings), in source order.

    A streamed hub source without ``max_docs`` stops after :data:`MAX_STREAMED_DOCS` documents
    with a warning. Raises :class:`DataError` when the source yields no text.
    """
    source = _resolve(src, text_field)
    limit = None if max_docs is None else _as_int(max_docs, "max_docs", 1)
    if limit is None and source.streamed:
        limit = MAX_STREAMED_DOCS
    documents = list(itertools.islice(source.documents(), limit))
    if not documents:
        raise DataError(f"The data source '{src}' contains no text.")
    if max_docs is None and source.streamed and len(documents) == limit:
        warnings.warn(f"Read the first {limit} documents of '{src}'; pass max_docs to read more or fewer.", stacklevel=2)
    return documents


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for every non-blank line of a JSON-lines file; one line names a bad one."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number} is not valid JSON ({error.msg}).") from None
