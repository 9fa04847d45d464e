"""The builtin offline English corpus: Python's pydoc topics and standard-library docstrings, plus the Wikipedia and
news text shipped in the gensim wheel (wiki markup stripped by :func:`clean_wikitext`)."""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from hookmoe.errors import DataError



if TYPE_CHECKING:
    pass


_GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


_GENSIM_NEWS = "lee_background.cor"


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
