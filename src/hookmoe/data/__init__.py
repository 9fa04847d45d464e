"""Text and multiple-choice data: sources (builtin corpus, hub, local files), train/held-out splits, token
blocks with a content-keyed cache, multiple-choice items.
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
