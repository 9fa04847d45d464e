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
    The MATH competition problems, ``problem + "
" + solution``, streamed from the hub.
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

from .blocks import needs_bos, tokenizer_fingerprint, default_cache_dir, make_blocks, num_batches, iter_batches
from .builtin import clean_wikitext
from .mc import MCItem, load_mc, builtin_mc
from .sources import BUILTIN_SOURCES, SPLITS, TEXT_SUFFIXES, JSONL_SUFFIXES, JSON_SUFFIXES, PARQUET_SUFFIXES, MAX_STREAMED_DOCS, TOKEN_OVERSAMPLE, iter_documents, load_documents
from .splits import split_documents

__all__ = [
    "needs_bos",
    "tokenizer_fingerprint",
    "default_cache_dir",
    "make_blocks",
    "num_batches",
    "iter_batches",
    "clean_wikitext",
    "MCItem",
    "load_mc",
    "builtin_mc",
    "BUILTIN_SOURCES",
    "SPLITS",
    "TEXT_SUFFIXES",
    "JSONL_SUFFIXES",
    "JSON_SUFFIXES",
    "PARQUET_SUFFIXES",
    "MAX_STREAMED_DOCS",
    "TOKEN_OVERSAMPLE",
    "iter_documents",
    "load_documents",
    "split_documents",
]
