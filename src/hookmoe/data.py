"""Calibration and evaluation data: text sources, document splits, packed token blocks, multiple choice.

Text sources
------------
Every function that reads text takes a source string ``src``:

``builtin``
    Offline English that needs no download: Python's ``pydoc`` help topics and standard-library
    docstrings, plus -- when ``gensim`` is installed -- the Wikipedia sample and the Lee news corpus
    its wheel ships as test data. ``builtin:pydoc``, ``builtin:wiki`` and ``builtin:news`` select
    one part. The order is fixed, so the corpus is the same on every run with the same Python
    (and gensim) build.
``c4[@split]``
    ``allenai/c4``, config ``en``, streamed from the hub (needs ``datasets``).
``math[@split]``
    The MATH competition problems, ``problem + "\\n" + solution``, streamed from the hub.
``hf:DATASET[:CONFIG][@SPLIT]``
    Any hub dataset, streamed; the text is the ``text_field`` column.
a path
    A ``.txt``/``.md`` file (documents separated by blank lines), ``.jsonl`` (one object per line,
    text in ``text_field``), ``.json`` (a list of objects or strings), ``.parquet`` (the
    ``text_field`` column), the text formats optionally gzipped (``.jsonl.gz``), or a folder of such
    files (recursive, sorted). Named sources win over paths: write ``./c4`` for a folder named c4.

Splits
------
Documents, never pieces of them, go to ``train`` or ``heldout``, so the two never share text.
A finite source (builtin, local) is deduplicated and its documents ranked by a hash of their text;
the ``heldout_fraction`` with the smallest hashes are held out (at least one document each side
when there are two or more). A streamed source cannot be ranked, so each document is held out iff
its hash, read as a number in [0, 1), is below ``heldout_fraction``; the rule needs no other
document, so any prefix of the stream splits the same way. ``all`` takes every document.

Blocks
------
:func:`make_blocks` tokenises documents in a seeded order (no special tokens), puts the EOS id
after each one, concatenates them, cuts the stream into non-overlapping windows and draws
``n_blocks`` of them with the seed. It stops tokenising at four times the tokens it needs. When
the tokenizer's own call starts text with BOS (:func:`needs_bos`), every block starts with BOS.
Results are cached as ``.safetensors`` files keyed by everything that determines them.

Everything that goes wrong because of the input raises :class:`DataError` with one sentence
meant for the user.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import html
import importlib
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import operator
import os
import re
import sys
import uuid
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BUILTIN_SOURCES",
    "DataError",
    "MCItem",
    "SPLITS",
    "builtin_mc",
    "clean_wikitext",
    "default_cache_dir",
    "iter_batches",
    "iter_documents",
    "load_documents",
    "load_mc",
    "make_blocks",
    "needs_bos",
    "num_batches",
    "split_documents",
    "tokenizer_fingerprint",
]


class DataError(UserError):
    """Bad data input (unknown source, missing file, too little text, ...); the message is one sentence.

    A :class:`~hookmoe.errors.UserError`, hence a ``ValueError``.
    """


# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

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

_GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_GENSIM_NEWS = "lee_background.cor"
_HUB_HINT = "install it with `pip install hookmoe[hub]` (or `pip install datasets`)"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, purpose: str) -> np.random.RandomState:
    """A generator for one purpose; ``RandomState`` streams are frozen by NumPy's policy."""
    digest = hashlib.blake2b(f"hookmoe:{purpose}:{seed}".encode(), digest_size=16).digest()
    return np.random.RandomState(np.frombuffer(digest, dtype="<u4"))


def _as_int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise DataError(f"{name} must be an integer, not {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise DataError(f"{name} must be an integer, not {value!r}.") from None
    if minimum is not None and number < minimum:
        raise DataError(f"{name} must be at least {minimum}, got {number}.")
    return number


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _dedupe(texts: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for text in texts:
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


# ---------------------------------------------------------------------------------------------
# Wikipedia markup
# ---------------------------------------------------------------------------------------------

_DROPPED_TAGS = (
    "ref|references|gallery|math|timeline|imagemap|score|syntaxhighlight|source|templatedata"
    "|chem|ce|hiero|graph|mapframe|maplink|inputbox|categorytree"
)
_RE_COMMENT = re.compile(r"<!--.*?-->", re.S)
_RE_SELF_CLOSING = re.compile(rf"<(?:{_DROPPED_TAGS})\b[^>]*/>", re.I)
_RE_PAIRED = re.compile(rf"<({_DROPPED_TAGS})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_RE_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_RE_TAIL_SECTION = re.compile(
    r"^==+\s*(?:see also|references|notes|notes and references|external links|further reading"
    r"|bibliography|sources|footnotes|citations)\s*==+\s*$",
    re.I | re.M,
)
# Innermost links first; single brackets may appear inside (captions like "Bicyclo[1.1.0]butane").
_RE_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")
_RE_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_RE_QUOTES = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_RE_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_BR = re.compile(r"<br\s*/?>", re.I)
_RE_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;:]*\s*\)")
_RE_SPACES = re.compile(r"[ \t]+")
_RE_SPACE_PUNCT = re.compile(r" +([,.;:!?)])")
_DROPPED_LINK_NAMESPACES = {"file", "image", "category", "media"}
_RE_INTERWIKI = re.compile(r"^[a-z][a-z\-]{1,11}:")


def _replace_link(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    namespace = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace in _DROPPED_LINK_NAMESPACES:
        return ""
    if label:
        return label.rsplit("|", 1)[-1]
    if _RE_INTERWIKI.match(target):  # [[de:Anarchismus]] and the like
        return ""
    return target.lstrip(":")


def _sub_until_stable(pattern: re.Pattern[str], repl: Any, text: str, limit: int = 100) -> str:
    for _ in range(limit):
        text, count = pattern.subn(repl, text)
        if not count:
            break
    return text


def clean_wikitext(markup: str) -> str:
    """Plain prose from MediaWiki markup.

    Drops comments, references and other non-prose tags, templates ``{{..}}``, tables ``{|..|}``,
    file/image/category and interlanguage links, and everything from the first "See also" /
    "References" / "External links" (and similar) heading on. Keeps link text
    (``[[target|text]]`` -> ``text``), external link labels, headings (``== x ==`` -> ``x``),
    list items (without markers) and the text inside formatting tags; removes ''/''' quotes.
    """
    text = markup.replace("\r\n", "\n")
    text = _RE_COMMENT.sub("", text)
    text = _RE_SELF_CLOSING.sub("", text)
    text = _RE_PAIRED.sub("", text)
    text = _sub_until_stable(_RE_TEMPLATE, "", text)
    text = _sub_until_stable(_RE_TABLE, "", text)
    tail = _RE_TAIL_SECTION.search(text)
    if tail:
        text = text[: tail.start()]
    text = _sub_until_stable(_RE_LINK, _replace_link, text)
    text = _RE_EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _RE_QUOTES.sub("", text)
    text = _RE_HEADING.sub(lambda m: m.group(2), text)
    text = _RE_LIST.sub("", text)
    text = _RE_MAGIC.sub("", text)
    text = _RE_BR.sub("\n", text)
    text = _RE_TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = _RE_EMPTY_PARENS.sub("", text)
    lines = []
    for raw in text.split("\n"):
        line = _RE_SPACE_PUNCT.sub(r"\1", _RE_SPACES.sub(" ", raw)).strip()
        # Leftovers of unbalanced templates/tables and bare punctuation are not prose.
        if line.startswith(("|", "!", "{", "}")) or "{{" in line or "}}" in line:
            line = ""
        if line and not any(ch.isalnum() for ch in line):
            line = ""
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------------------------------------
# The built-in offline corpus
# ---------------------------------------------------------------------------------------------

# Standard-library modules with good docstrings whose public members do not depend on the OS
# (no webbrowser, selectors, subprocess, socketserver, ...). Fixed order.
_DOC_MODULES = (
    "abc argparse ast asyncio.base_events asyncio.events asyncio.locks asyncio.queues asyncio.streams "
    "asyncio.tasks base64 bdb bisect calendar cmd code codecs collections collections.abc colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "doctest email.message email.parser email.utils enum filecmp fileinput fnmatch fractions ftplib "
    "functools getopt gettext glob graphlib gzip heapq hmac html html.parser http.client "
    "http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.metadata "
    "importlib.resources inspect ipaddress json json.decoder json.encoder keyword linecache logging "
    "logging.config logging.handlers lzma mailbox mimetypes numbers operator optparse pathlib pdb "
    "pickle pickletools pkgutil plistlib poplib pprint profile pstats queue quopri random re reprlib "
    "sched secrets shelve shlex shutil smtplib statistics string "
    "tarfile tempfile textwrap threading timeit tokenize tomllib trace traceback types typing "
    "unittest.case unittest.mock unittest.suite urllib.parse urllib.request uuid warnings wave "
    "weakref xml.dom.minidom xml.etree.ElementTree xml.sax.handler zipfile zipimport zoneinfo "
    "builtins itertools math cmath struct array binascii codeop compileall py_compile pyclbr runpy "
    "symtable tabnanny zipapp modulefinder pydoc asyncio.futures asyncio.protocols "
    "asyncio.subprocess asyncio.transports concurrent.futures.process concurrent.futures.thread "
    "email.headerregistry email.policy email.feedparser email.generator email.header email.charset "
    "multiprocessing.pool multiprocessing.managers multiprocessing.queues "
    "unittest.loader unittest.result unittest.runner wsgiref.handlers wsgiref.simple_server "
    "xmlrpc.client xmlrpc.server xml.dom.pulldom xml.sax.saxutils sqlite3.dbapi2"
).split()
_MIN_DOCSTRING = 150  # characters; shorter docstrings are mostly signatures and one-liners


@functools.lru_cache(maxsize=None)
def _pydoc_topics() -> tuple[str, ...]:
    """Python's help topics (``help('assert')`` etc.), sorted by topic name."""
    from pydoc_data.topics import topics

    return tuple(topics[name].strip() for name in sorted(topics) if topics[name].strip())


def _own_docstring(obj: Any) -> str | None:
    try:
        doc = obj.__doc__
    except Exception:
        return None
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc)
    return doc if len(doc) >= _MIN_DOCSTRING else None


def _defined_in(obj: Any, module_name: str) -> bool:
    try:
        return getattr(obj, "__module__", None) == module_name
    except Exception:
        return False


def _method_of(member: Any, cls: type, module_name: str) -> bool:
    """Whether a class attribute is the class's own code, not a function patched in by another library
    (transformers adds ``logging.Logger.warning_once``, for example), so the corpus does not depend on
    what was imported before it."""
    function = member.fget if isinstance(member, property) else member
    if hasattr(function, "__module__"):
        return _defined_in(function, module_name)
    return getattr(function, "__objclass__", None) is cls  # methods of C classes


@functools.lru_cache(maxsize=None)
def _stdlib_docstrings() -> tuple[str, ...]:
    """One document per module: its docstring and those of its public classes, methods and functions."""
    seen: set[str] = set()
    documents = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in _DOC_MODULES:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # a module missing from this build
                continue
            parts: list[str] = []

            def take(title: str, obj: Any) -> None:
                doc = _own_docstring(obj)
                if doc is not None and doc not in seen:
                    seen.add(doc)
                    parts.append(f"{title}\n{doc.strip()}")

            take(f"Module {module_name}", module)
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or not _defined_in(obj, module_name):
                    continue
                if inspect.isclass(obj):
                    take(f"{module_name}.{name}", obj)
                    for member_name, member in sorted(vars(obj).items()):
                        if member_name.startswith("_"):
                            continue
                        if isinstance(member, (staticmethod, classmethod)):
                            member = member.__func__
                        if (inspect.isroutine(member) or isinstance(member, property)) and _method_of(
                            member, obj, module_name
                        ):
                            take(f"{module_name}.{name}.{member_name}", member)
                elif inspect.isroutine(obj):
                    take(f"{module_name}.{name}", obj)
            if parts:
                documents.append("\n\n".join(parts))
    return tuple(documents)


def _gensim_data_dir() -> Path | None:
    """gensim's bundled test data folder, found without importing gensim (which is slow)."""
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    return folder if folder.is_dir() else None


@functools.lru_cache(maxsize=4)
def _wiki_articles(path: str) -> tuple[str, ...]:
    """Articles of a MediaWiki XML dump (bz2), as clean prose with the title as first line."""
    articles = []
    with bz2.open(path, "rb") as stream:
        for _, element in ElementTree.iterparse(stream):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            namespace = element.findtext("{*}ns")
            markup = element.findtext("{*}revision/{*}text") or ""
            redirect = element.find("{*}redirect") is not None or markup.lstrip()[:9].upper() == "#REDIRECT"
            title = (element.findtext("{*}title") or "").strip()
            element.clear()
            if namespace != "0" or redirect:
                continue
            body = clean_wikitext(markup)
            if len(body) >= 200:
                articles.append(f"{title}\n\n{body}")
    return tuple(articles)


@functools.lru_cache(maxsize=4)
def _news_articles(path: str) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as handle:
        return tuple(line.strip() for line in handle if line.strip())


def _gensim_file(name: str, src: str, required: bool) -> Path | None:
    folder = _gensim_data_dir()
    path = folder / name if folder is not None else None
    if path is not None and path.is_file():
        return path
    if required:
        raise DataError(
            f"'{src}' needs the English text shipped with gensim, which is not installed; "
            "install it with `pip install gensim` or use 'builtin:pydoc'."
        )
    return None


def _builtin_documents(name: str) -> list[str]:
    part = name.partition(":")[2]
    documents: list[str] = []
    if part in ("", "wiki"):
        path = _gensim_file(_GENSIM_WIKI, name, required=part == "wiki")
        if path is not None:
            documents += _wiki_articles(str(path))
    if part in ("", "news"):
        path = _gensim_file(_GENSIM_NEWS, name, required=part == "news")
        if path is not None:
            documents += _news_articles(str(path))
    if part in ("", "pydoc"):
        documents += _pydoc_topics()
        documents += _stdlib_docstrings()
    return _dedupe(documents)


def _builtin_fingerprint(name: str) -> dict[str, Any]:
    gensim = None
    if name in ("builtin", "builtin:wiki", "builtin:news") and _gensim_data_dir() is not None:
        try:
            gensim = importlib.metadata.version("gensim")
        except importlib.metadata.PackageNotFoundError:
            gensim = "unknown"
    return {"builtin": name, "python": sys.version, "platform": sys.platform, "gensim": gensim}


# ---------------------------------------------------------------------------------------------
# Hub sources (streamed with `datasets`)
# ---------------------------------------------------------------------------------------------


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
                "choose the text field with text_field."
            )
        pieces.append(value.strip())
    return "\n".join(pieces).strip()


def _iter_hub(spec: _HubSpec, shuffle_seed: int | None) -> Iterator[str]:
    datasets = _import_datasets()
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


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


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
            raise DataError(f"{where} has no '{text_field}' field (its fields: {fields}); choose the text field with text_field.")
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


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    kind = _file_kind(path)
    if kind == "text":
        with _open_text(path) as handle:
            text = handle.read().replace("\r\n", "\n")
        yield from (doc.strip() for doc in re.split(r"\n[ \t]*\n", text))
    elif kind == "jsonl":
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {number} is not valid JSON ({error.msg}).") from None
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
    out = []
    for file in files:
        stat = file.stat()
        out.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


# ---------------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------------


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
        raise DataError("text_field must be a non-empty field name such as 'text'.")
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


# ---------------------------------------------------------------------------------------------
# Documents and splits
# ---------------------------------------------------------------------------------------------


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


def _check_split(split: str, heldout_fraction: float) -> float:
    if split not in SPLITS:
        raise DataError(f"Unknown split '{split}'; choose one of {', '.join(SPLITS)}.")
    try:
        fraction = float(heldout_fraction)
    except (TypeError, ValueError):
        raise DataError(f"heldout_fraction must be a number in [0, 1), got {heldout_fraction!r}.") from None
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}.")
    return fraction


def split_documents(documents: Sequence[str], split: str, heldout_fraction: float = 0.1) -> list[str]:
    """The documents of one split of a finite collection, in their original order, deduplicated.

    ``round(heldout_fraction * n)`` distinct documents -- those whose text hashes lowest -- are held
    out, at least one and at most ``n - 1`` when ``n >= 2`` and the fraction is positive. The rule
    depends only on the set of texts, not on their order.
    """
    fraction = _check_split(split, heldout_fraction)
    unique = _dedupe(documents)
    if split == "all":
        return unique
    n_heldout = int(round(fraction * len(unique)))
    if fraction > 0 and len(unique) >= 2:
        n_heldout = min(max(n_heldout, 1), len(unique) - 1)
    ranked = sorted(unique, key=lambda text: (_text_hash(text), text))
    heldout = set(ranked[:n_heldout])
    return [text for text in unique if (text in heldout) == (split == "heldout")]


def _in_streamed_split(text: str, split: str, fraction: float) -> bool:
    if split == "all":
        return True
    return (_text_hash(text) / 2**64 < fraction) == (split == "heldout")


def _split_error(src: str, split: str, n_documents: int, fraction: float) -> DataError:
    if n_documents == 1:
        return DataError(
            f"'{src}' holds a single document, so its {split} split is empty; separate documents with "
            "blank lines, add files, or use split='all'."
        )
    return DataError(
        f"The {split} split of '{src}' is empty ({n_documents} documents, heldout_fraction={fraction}); "
        "use more documents or another split."
    )


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Packed blocks
# ---------------------------------------------------------------------------------------------


def _progress_bar(enabled: bool, description: str, total: int) -> Any:
    """A context manager yielding ``update(completed)``; a no-op when disabled."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar() -> Iterator[Any]:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("{task.description}"),
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


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


@dataclass
class MCItem:
    """One multiple-choice question: score ``context + continuation(i)`` for each choice ``i``.

    ``label`` is the 0-based index of the correct choice. Construction validates the item and
    raises :class:`DataError` when it is unusable.
    """

    context: str
    choices: list[str]
    label: int

    def __post_init__(self) -> None:
        if not isinstance(self.context, str) or not self.context.strip():
            raise DataError("A multiple-choice item needs a non-empty context.")
        if not isinstance(self.choices, list) or len(self.choices) < 2:
            count = len(self.choices) if isinstance(self.choices, list) else 0
            raise DataError(f"A multiple-choice item needs at least 2 choices, got {count}.")
        if not all(isinstance(choice, str) and choice.strip() for choice in self.choices):
            raise DataError("Every choice of a multiple-choice item must be non-empty text.")
        if isinstance(self.label, bool) or not isinstance(self.label, int) or not 0 <= self.label < len(self.choices):
            raise DataError(f"Label {self.label!r} is not the index of one of the {len(self.choices)} choices.")

    def continuation(self, index: int) -> str:
        """Choice ``index`` as appended to the context: with a separating space unless one is there."""
        choice = self.choices[index]
        if self.context[-1].isspace() or choice[0].isspace():
            return choice
        return " " + choice


_MC_CONTEXT_KEYS = ("context", "question", "query", "ctx", "question_stem", "input")
_MC_CHOICE_KEYS = ("choices", "endings", "options")
_MC_LABEL_KEYS = ("label", "answer", "gold", "answerKey")


def _first_key(record: dict[str, Any], keys: Sequence[str], what: str, where: str) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    fields = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(f"{where} has no {what} field ({' / '.join(keys)}); its fields: {fields}.")


def _mc_choices(raw: Any, where: str) -> tuple[list[str], list[str] | None]:
    """Choice texts and, when the data names them (A, B, ...), their labels."""
    if isinstance(raw, dict) and "text" in raw:
        texts, names = raw["text"], raw.get("label")
    elif isinstance(raw, list) and raw and all(isinstance(c, dict) and "text" in c for c in raw):
        texts, names = [c["text"] for c in raw], [c.get("label") for c in raw]
    else:
        texts, names = raw, None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where}: choices must be a list of strings.")
    if names is not None and (len(names) != len(texts) or not all(isinstance(n, str) for n in names)):
        names = None
    return texts, names


def _mc_label(raw: Any, choices: list[str], names: list[str] | None, where: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        value = raw.strip()
        if names is not None and value in names:
            return names.index(value)
        if value in choices:
            return choices.index(value)
        if value.lstrip("-").isdigit():
            return int(value)
        if len(value) == 1 and "A" <= value.upper() <= "Z":
            return ord(value.upper()) - ord("A")
    raise DataError(f"{where}: cannot read the label {raw!r} as a choice index, letter or choice text.")


def _mc_record(record: Any, where: str) -> MCItem:
    if not isinstance(record, dict):
        raise DataError(f"{where} is {type(record).__name__}, expected an object with context, choices and label.")
    context = _first_key(record, _MC_CONTEXT_KEYS, "context", where)
    choices, names = _mc_choices(_first_key(record, _MC_CHOICE_KEYS, "choices", where), where)
    label = _mc_label(_first_key(record, _MC_LABEL_KEYS, "label", where), choices, names, where)
    if not isinstance(context, str):
        raise DataError(f"{where}: the context must be text.")
    try:
        return MCItem(context, choices, label)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None


def _bigbench_items(task: dict[str, Any], where: str) -> list[MCItem]:
    examples = task.get("examples")
    if not isinstance(examples, list):
        raise DataError(f"{where} has no list of examples.")
    items = []
    for number, example in enumerate(examples):
        scores = example.get("target_scores") if isinstance(example, dict) else None
        if not scores:
            continue  # generative examples have no choices
        if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) for v in scores.values()):
            raise DataError(f"{where}, example {number}: target_scores must map choices to numbers.")
        choices = list(scores)
        best = max(range(len(choices)), key=lambda i: (scores[choices[i]], -i))
        try:
            items.append(MCItem(example.get("input", ""), choices, best))
        except DataError as error:
            raise DataError(f"{where}, example {number}: {error}") from None
    return items


def load_mc(path: str | Path) -> list[MCItem]:
    """Multiple-choice items from a JSONL file, a JSON list, or a BIG-bench ``task.json`` (file or task folder).

    JSONL/JSON records need a context (``context``/``question``/``query``/``ctx``), choices
    (``choices``/``endings``/``options``; a list, or ``{"text": [...], "label": [...]}``) and a label
    (``label``/``answer``/``gold``/``answerKey``: a 0-based index, a choice letter, or the choice
    text). BIG-bench examples use ``input`` and ``target_scores``; the best-scored choice is the
    label and examples without ``target_scores`` are skipped.
    """
    file = Path(path).expanduser()
    if file.is_dir() and (file / "task.json").is_file():
        file = file / "task.json"
    if not file.is_file():
        raise DataError(f"Multiple-choice file not found: {path}.")
    kind = _file_kind(file)
    items: list[MCItem] = []
    if kind == "jsonl":
        with _open_text(file) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{file}, line {number} is not valid JSON ({error.msg}).") from None
                items.append(_mc_record(record, f"{file}, line {number}"))
    elif kind == "json":
        with _open_text(file) as handle:
            try:
                content = json.load(handle)
            except json.JSONDecodeError as error:
                raise DataError(f"{file} is not valid JSON ({error.msg} at line {error.lineno}).") from None
        if isinstance(content, dict) and "examples" in content:
            items = _bigbench_items(content, str(file))
        elif isinstance(content, list):
            items = [_mc_record(record, f"{file}, item {n}") for n, record in enumerate(content)]
        else:
            raise DataError(f"{file} is neither a BIG-bench task (with 'examples') nor a list of items.")
    else:
        raise DataError(f"{file} is not a multiple-choice file; use .jsonl, a JSON list, or a BIG-bench task.json.")
    if not items:
        raise DataError(f"{file} contains no multiple-choice items.")
    return items


_RE_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_RE_PROSE_SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;'\-]*[a-z][A-Za-z0-9 ,;'\-]*\.")


@functools.lru_cache(maxsize=8)
def _mc_sentences(src: str, split: str) -> tuple[tuple[str, str], ...]:
    """(first part, rest) of every clean prose sentence of 10-40 words in ``src``'s ``split``."""
    pairs = []
    seen: set[str] = set()
    for document in split_documents(load_documents(src), split):
        for paragraph in re.split(r"\n\s*\n", document):
            if re.search(r"^\s{2,}\S", paragraph, re.M):  # indented code or tables
                continue
            for sentence in _RE_SENTENCE_END.split(" ".join(paragraph.split())):
                words = sentence.split()
                if not 10 <= len(words) <= 40 or sentence in seen or not _RE_PROSE_SENTENCE.fullmatch(sentence):
                    continue
                seen.add(sentence)
                cut = max(4, (len(words) * 11) // 20)
                pairs.append((" ".join(words[:cut]), " ".join(words[cut:])))
    return tuple(pairs)


def builtin_mc(n: int, seed: int = 0, *, n_choices: int = 4, src: str = "builtin", split: str = "heldout") -> list[MCItem]:
    """An offline multiple-choice sanity set: which continuation completes this sentence?

    Each item's context is the first ~55% of a real sentence from ``split`` of ``src`` (by default
    the held-out part of the built-in corpus, so a Hook trained on ``builtin`` never saw it); the
    correct choice is the rest of that sentence, the distractors the rests of other sentences of
    similar length. Deterministic given ``seed``.
    """
    n = _as_int(n, "n", 1)
    n_choices = _as_int(n_choices, "n_choices", 2)
    seed = _as_int(seed, "seed")
    pairs = _mc_sentences(src, split)
    if len(pairs) < max(n, n_choices):
        raise DataError(
            f"The {split} split of '{src}' has {len(pairs)} usable sentences, too few for {n} items "
            f"with {n_choices} choices; ask for fewer items or use split='all'."
        )
    rng = _rng(seed, "mc")
    lengths = np.array([len(rest.split()) for _, rest in pairs])
    items = []
    for index in rng.permutation(len(pairs))[:n]:
        context, answer = pairs[index]
        similar = np.flatnonzero(np.abs(lengths - lengths[index]) <= max(2, lengths[index] // 3))
        distractors: list[str] = []
        for pool in (similar, np.arange(len(pairs))):
            for other in rng.permutation(pool):
                rest = pairs[other][1]
                if other != index and rest != answer and rest not in distractors:
                    distractors.append(rest)
                    if len(distractors) == n_choices - 1:
                        break
            if len(distractors) == n_choices - 1:
                break
        label = int(rng.randint(n_choices))
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append(MCItem(context, choices, label))
    return items
