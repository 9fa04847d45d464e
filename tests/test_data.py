"""Tests for hookmoe.data: sources, splits, packing, cache, batches, multiple choice. Offline and fast."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import hookmoe.data as D
from hookmoe.data import blocks as D_blocks, builtin as D_builtin, sources as D_sources, splits as D_splits
from hookmoe.data import MCItem
from hookmoe.errors import DataError

HAS_GENSIM_DATA = D_builtin._gensim_data_dir() is not None and (D_builtin._gensim_data_dir() / D_builtin._GENSIM_WIKI).is_file()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma omega".split()


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def byt5():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level fast tokenizer whose default call prepends <bos> (like Gemma's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for word in WORDS + [f"d{i:03d}" for i in range(200)]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def _doc(i: int) -> str:
    """Document i: a unique marker, then 20-49 words drawn with seed i."""
    rng = random.Random(i)
    return f"<{i:03d}> d{i:03d} " + " ".join(rng.choice(WORDS) for _ in range(20 + (i * 7) % 30))


@pytest.fixture()
def corpus_txt(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(_doc(i) for i in range(80)) + "\n", encoding="utf-8")
    return path


def _segments(row: torch.Tensor, eos: int) -> list[list[int]]:
    out, current = [], []
    for token in row.tolist():
        if token == eos:
            out.append(current)
            current = []
        else:
            current.append(token)
    out.append(current)
    return out


def _markers(tokenizer, blocks: torch.Tensor) -> set[int]:
    text = " ".join(tokenizer.decode(row) for row in blocks)
    return {int(m) for m in re.findall(r"<(\d{3})>", text)}


# ------------------------------------------------------------------------------- builtin corpus


def test_builtin_pydoc_is_nonempty_english():
    docs = D.load_documents("builtin:pydoc")
    assert len(docs) > 150
    assert sum(map(len, docs)) > 500_000
    assert all(isinstance(d, str) and d == d.strip() and d for d in docs)
    assert len(set(docs)) == len(docs)
    assert any("assert" in d and "AssertionError" in d for d in docs)  # a pydoc topic
    assert any(d.startswith("Module json") for d in docs)  # a stdlib docstring document


def test_builtin_is_deterministic_across_processes():
    """Same corpus in a fresh interpreter with a different hash seed (no set/dict-order dependence)."""
    docs = D.load_documents("builtin")
    here = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    code = (
        "import hashlib; from hookmoe.data import load_documents; "
        "print(hashlib.sha256('\\x00'.join(load_documents('builtin')).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == here
    assert D.load_documents("builtin") == docs


def test_docstring_corpus_ignores_methods_patched_in_by_libraries(monkeypatch):
    """transformers adds Logger.warning_once; the corpus must not depend on whether it was imported."""
    before = D_builtin._stdlib_docstrings()

    def patched_in(self):
        pass

    patched_in.__doc__ = "A method another library patched into logging.Logger at import time. " * 5
    monkeypatch.setattr(logging.Logger, "patched_in", patched_in, raising=False)
    D_builtin._stdlib_docstrings.cache_clear()
    try:
        assert D_builtin._stdlib_docstrings() == before
    finally:
        D_builtin._stdlib_docstrings.cache_clear()


def test_data_error_is_a_user_error():
    from hookmoe.errors import UserError

    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


@pytest.mark.skipif(not HAS_GENSIM_DATA, reason="gensim (with its test data) is not installed")
def test_builtin_wiki_is_clean_prose():
    wiki = D.load_documents("builtin:wiki")
    assert len(wiki) == 106  # articles of the dump that are not redirects
    assert wiki[0].startswith("Anarchism\n\nAnarchism is a political philosophy")
    text = "\n".join(wiki)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "{|", "|}", "[[Category:", "&nbsp;"):
        assert markup not in text
    news = D.load_documents("builtin:news")
    assert 250 <= len(news) <= 300
    everything = D.load_documents("builtin")
    pydoc = D.load_documents("builtin:pydoc")
    assert everything == wiki + news + pydoc


def test_builtin_without_gensim(monkeypatch):
    monkeypatch.setattr(D_builtin, "_gensim_data_dir", lambda: None)
    with pytest.raises(DataError, match="gensim"):
        D.load_documents("builtin:wiki")
    assert D.load_documents("builtin") == D.load_documents("builtin:pydoc")


def test_clean_wikitext():
    markup = (
        "{{Infobox|name={{nested|x}}}}\n'''Foo''' is a [[bar (thing)|bar]] and a [[Baz]].<ref name=a>Cite</ref>"
        "<ref name=b/> It has ''style''.<!-- hidden -->\n"
        "[[File:x.png|thumb|A [[caption]] with Bicyclo[1.1.0] brackets]]\n"
        "== History ==\n* First item &amp; more\n"
        '{| class="wikitable"\n|-\n| cell || cell\n|}\n'
        "See [http://example.org the site] and [http://bare.org].\n"
        "[[Category:Things]] [[de:Foo]]\n"
        "== References ==\n{{reflist}}\nTail text."
    )
    clean = D.clean_wikitext(markup)
    assert clean == (
        "Foo is a bar and a Baz. It has style.\n\nHistory\nFirst item & more\n\nSee the site and."
    )


# ------------------------------------------------------------------------------------- splits


def test_split_documents_is_a_disjoint_cover():
    docs = [_doc(i) for i in range(100)] + [_doc(3)]  # a duplicate is dropped, not split
    train = D.split_documents(docs, "train")
    heldout = D.split_documents(docs, "heldout", 0.1)
    assert len(heldout) == 10 and len(train) == 90
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(docs)
    # order-independent: the same texts in another order split the same way
    assert set(D.split_documents(list(reversed(docs)), "heldout")) == set(heldout)
    assert D.split_documents(docs, "all") == docs[:100]
    assert len(D.split_documents(docs[:2], "heldout")) == 1
    assert D.split_documents(docs[:1], "heldout") == []


@pytest.mark.parametrize("split,fraction", [("validation", 0.1), ("test", 0.1), ("train", 1.0), ("train", -0.1)])
def test_bad_split_or_fraction(split, fraction):
    with pytest.raises(DataError):
        D.split_documents(["a", "b"], split, fraction)


def test_make_blocks_train_and_heldout_share_no_document(byt5, corpus_txt):
    docs = D.load_documents(str(corpus_txt))
    heldout_ids = {int(d[1:4]) for d in D.split_documents(docs, "heldout")}
    train = D.make_blocks(byt5, str(corpus_txt), 40, 64, split="train", cache_dir=False)
    heldout = D.make_blocks(byt5, str(corpus_txt), 8, 64, split="heldout", cache_dir=False)
    train_seen, heldout_seen = _markers(byt5, train), _markers(byt5, heldout)
    assert heldout_seen and train_seen
    assert heldout_seen <= heldout_ids
    assert not train_seen & heldout_ids


def test_streamed_split_rule():
    texts = [f"page {i}" for i in range(3000)]
    held = [t for t in texts if D_splits._in_streamed_split(t, "heldout", 0.1)]
    train = [t for t in texts if D_splits._in_streamed_split(t, "train", 0.1)]
    assert 0.07 < len(held) / len(texts) < 0.13
    assert not set(held) & set(train) and len(held) + len(train) == len(texts)


# -------------------------------------------------------------------------------------- blocks


def test_make_blocks_shape_and_seed(byt5, corpus_txt):
    a = D.make_blocks(byt5, str(corpus_txt), 16, 48, seed=0, cache_dir=False)
    b = D.make_blocks(byt5, str(corpus_txt), 16, 48, seed=0, cache_dir=False)
    c = D.make_blocks(byt5, str(corpus_txt), 16, 48, seed=1, cache_dir=False)
    assert a.shape == (16, 48) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row) for row in a.tolist()}) == 16  # distinct windows
    assert int(a.min()) >= 0 and int(a.max()) < len(byt5)


def test_make_blocks_separates_documents_with_eos(byt5, corpus_txt):
    texts = set(D.load_documents(str(corpus_txt)))
    blocks = D.make_blocks(byt5, str(corpus_txt), 30, 128, cache_dir=False)
    eos = byt5.eos_token_id
    assert (blocks == eos).sum() > 0
    for row in blocks:
        segments = _segments(row, eos)
        if len(segments) == 1:  # inside one document
            assert any(byt5.decode(row) in t for t in texts)
            continue
        first, *inner, last = segments
        for segment in inner:  # a piece between two EOS is one whole document
            assert byt5.decode(segment) in texts
        assert any(t.endswith(byt5.decode(first)) for t in texts)
        assert any(t.startswith(byt5.decode(last)) for t in texts)


def test_bos_is_automatic(byt5, bos_tokenizer, tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(f"d{i:03d} " + " ".join(WORDS[i % 5 :] * 3) for i in range(60)), encoding="utf-8")
    assert D.needs_bos(bos_tokenizer) is True
    assert D.needs_bos(byt5) is False
    blocks = D.make_blocks(bos_tokenizer, str(path), 12, 16, cache_dir=False)
    assert blocks.shape == (12, 16)
    assert (blocks[:, 0] == bos_tokenizer.bos_token_id).all()
    assert not (blocks[:, 1:] == bos_tokenizer.bos_token_id).any()
    assert (blocks == bos_tokenizer.eos_token_id).any()
    plain = D.make_blocks(bos_tokenizer, str(path), 12, 16, add_bos=False, cache_dir=False)
    assert not (plain == bos_tokenizer.bos_token_id).any()
    with pytest.raises(DataError, match="no BOS"):
        D.make_blocks(byt5, str(path), 2, 16, add_bos=True, cache_dir=False)
    with pytest.raises(DataError, match="at least 2"):
        D.make_blocks(bos_tokenizer, str(path), 2, 1, cache_dir=False)


def test_make_blocks_tokenises_only_what_it_needs(byt5, tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(_doc(i % 1000) + f" {i}" for i in range(3000)), encoding="utf-8")
    seen = []
    original = D_blocks._tokenize_stream

    def spy(tokenizer, documents, target, progress=None):
        stream = original(tokenizer, documents, target, progress)
        seen.append((target, len(stream)))
        return stream

    monkeypatch.setattr(D_blocks, "_tokenize_stream", spy)
    D.make_blocks(byt5, str(path), 4, 64, cache_dir=False)
    target, tokens = seen[0]
    assert target == D.TOKEN_OVERSAMPLE * 4 * 64
    assert target <= tokens < 2 * target  # the file holds ~700k tokens
    # Documents are visited in a seeded order, so the few that get tokenised come from all over the file.
    monkeypatch.setattr(D_blocks, "_tokenize_stream", original)
    first = _markers(byt5, D.make_blocks(byt5, str(path), 8, 64, seed=0, cache_dir=False))
    second = _markers(byt5, D.make_blocks(byt5, str(path), 8, 64, seed=1, cache_dir=False))
    assert max(first) > 100 and max(second) > 100
    assert first != second


def test_cache_hit_and_safetensors(byt5, corpus_txt, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    first = D.make_blocks(byt5, str(corpus_txt), 8, 32, cache_dir=cache)
    files = list(cache.rglob("*"))
    files = [f for f in files if f.is_file()]
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    raw = files[0].read_bytes()
    assert not raw.startswith((b"\x80", b"PK"))  # neither pickle nor a torch zip
    with safe_open(str(files[0]), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("blocks"), first)
        key = handle.metadata()["hookmoe_key"]
    assert torch.equal(D.make_blocks(byt5, str(corpus_txt), 8, 32, cache_dir=cache), first)

    # The second call really reads the file: plant a marker tensor under the same key.
    save_file({"blocks": torch.full((8, 32), 7, dtype=torch.int64)}, str(files[0]), metadata={"hookmoe_key": key})
    assert (D.make_blocks(byt5, str(corpus_txt), 8, 32, cache_dir=cache) == 7).all()

    D.make_blocks(byt5, str(corpus_txt), 8, 32, seed=5, cache_dir=cache)
    corpus_txt.write_text(corpus_txt.read_text() + "\n\nA new document at the end.\n")
    os.utime(corpus_txt, ns=(1, 10**18))
    fresh = D.make_blocks(byt5, str(corpus_txt), 8, 32, cache_dir=cache)
    assert not (fresh == 7).all()  # changed file -> new key, recomputed
    assert len([f for f in cache.rglob("*.safetensors")]) == 3
    assert not list(cache.rglob("*.tmp"))


def test_cache_dir_default_uses_env(byt5, corpus_txt, tmp_path, monkeypatch):
    monkeypatch.setenv("HOOKMOE_CACHE", str(tmp_path / "envcache"))
    assert D.default_cache_dir() == tmp_path / "envcache"
    D.make_blocks(byt5, str(corpus_txt), 2, 32)
    assert len(list((tmp_path / "envcache").rglob("*.safetensors"))) == 1


def test_too_few_tokens_says_what_is_there(byt5, corpus_txt):
    with pytest.raises(DataError) as info:
        D.make_blocks(byt5, str(corpus_txt), 1000, 256, cache_dir=False)
    message = str(info.value)
    assert "holds only" in message and "256,000" in message and "fewer or shorter" in message
    assert "\n" not in message


def test_progress_bar(byt5, corpus_txt, capsys, monkeypatch):
    monkeypatch.setenv("HOOKMOE_PROGRESS", "always")  # pytest's stderr is not a terminal
    D.make_blocks(byt5, str(corpus_txt), 4, 32, cache_dir=False, progress=True)
    assert "Tokenising" in capsys.readouterr().err


# ------------------------------------------------------------------------------- local sources


def test_txt_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First doc line one.\nLine two.\n\n  \nSecond doc.\r\n\r\nThird.\n\n\n", encoding="utf-8")
    assert D.load_documents(str(path)) == ["First doc line one.\nLine two.", "Second doc.", "Third."]
    single = tmp_path / "one.txt"
    single.write_text("no blank lines\nat all\n", encoding="utf-8")
    assert D.load_documents(str(single)) == ["no blank lines\nat all"]
    assert D.load_documents(str(path), max_docs=2) == ["First doc line one.\nLine two.", "Second doc."]


def test_jsonl_json_and_gz(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n"three"\n', encoding="utf-8")
    assert D.load_documents(str(jsonl), text_field="body") == ["one", "two", "three"]
    with pytest.raises(DataError, match=r"line 1 has no 'text' field \(its fields: body, id\)"):
        D.load_documents(str(jsonl))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        D.load_documents(str(bad))
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps([{"text": "x"}, "y", {"text": ""}]), encoding="utf-8")
    assert D.load_documents(str(as_json)) == ["x", "y"]
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(DataError, match="JSON list"):
        D.load_documents(str(not_list))
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write('{"text": "zipped"}\n')
    assert D.load_documents(str(gz)) == ["zipped"]


def test_folder_is_recursive_and_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n', encoding="utf-8")
    (tmp_path / "c.txt").write_text("from c", encoding="utf-8")
    (tmp_path / "notes.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    assert D.load_documents(str(tmp_path)) == ["from a", "from b/z", "from c"]
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        D.load_documents(str(empty))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["p one", "p two", None], "n": [1, 2, 3]}), path)
    assert D.load_documents(str(path)) == ["p one", "p two"]
    with pytest.raises(DataError, match="no 'body' column"):
        D.load_documents(str(path), text_field="body")


def test_parquet_without_readers(tmp_path, monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, name, None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        D.load_documents(str(path))


# --------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "src,pattern",
    [
        ("no/such/file.txt", "not found"),
        ("missing.jsonl", "not found"),
        ("c5", "Unknown data source 'c5'"),
        ("builtin:nope", "Unknown built-in corpus"),
        ("hf:", "hf:DATASET"),
        ("", "empty"),
    ],
)
def test_bad_sources(src, pattern):
    with pytest.raises(DataError, match=pattern):
        D.load_documents(src)


def test_empty_and_unsupported_files(byt5, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(DataError, match="contains no text"):
        D.load_documents(str(empty))
    with pytest.raises(DataError, match="contains no text"):
        D.make_blocks(byt5, str(empty), 1, 8, cache_dir=False)
    odd = tmp_path / "x.csv"
    odd.write_text("a,b", encoding="utf-8")
    with pytest.raises(DataError, match="not a supported data file"):
        D.load_documents(str(odd))


def test_make_blocks_argument_errors(byt5, corpus_txt, tmp_path):
    with pytest.raises(DataError, match="Unknown split 'validation'"):
        D.make_blocks(byt5, str(corpus_txt), 2, 8, split="validation", cache_dir=False)
    with pytest.raises(DataError, match="n-blocks"):
        D.make_blocks(byt5, str(corpus_txt), 0, 8, cache_dir=False)
    single = tmp_path / "single.txt"
    single.write_text("just one document", encoding="utf-8")
    with pytest.raises(DataError, match="single document"):
        D.make_blocks(byt5, str(single), 1, 4, split="heldout", cache_dir=False)
    assert D.make_blocks(byt5, str(single), 1, 4, split="all", cache_dir=False).shape == (1, 4)


# ---------------------------------------------------------------------------------- hub sources


def _web_page(i: int) -> str:
    return f"Web page {i} " + " ".join(["words"] * (i % 40))


class _FakeStream:
    def __init__(self, rows, log):
        self.rows, self.log = rows, log

    def __iter__(self):
        for row in self.rows():
            self.log["pulled"] += 1
            yield row

    def shuffle(self, seed, buffer_size):
        self.log["shuffle"].append(seed)
        return self


@pytest.fixture()
def fake_hub(monkeypatch):
    """A stand-in `datasets` module: endless streams of rows, and one dataset that fails."""
    log = {"calls": [], "pulled": 0, "shuffle": [], "failing": {"broken/ds"}}

    def load_dataset(path, name=None, split=None, streaming=False):
        log["calls"].append((path, name, split, streaming))
        if path in log["failing"]:
            raise ConnectionError("Couldn't reach the hub")
        if "math" in path:
            rows = lambda: ({"problem": f"{name} problem {i}", "solution": f"answer {i}"} for i in range(3))  # noqa: E731
        elif path == "org/code":
            rows = lambda: ({"content": f"code {i}"} for i in range(5))  # noqa: E731
        else:
            rows = lambda: ({"text": _web_page(i), "url": "x"} for i in itertools.count())  # noqa: E731
        return _FakeStream(rows, log)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    from hookmoe import compat

    # the stand-in hub is "reachable" (the test session runs with HF_HUB_OFFLINE=1, and the real hub is not here)
    monkeypatch.setattr(compat, "hub_offline_reason", lambda *a, **k: None)
    return log


def test_c4_streams_and_respects_max_docs(fake_hub):
    docs = D.load_documents("c4", max_docs=5)
    assert len(docs) == 5 and docs[0].startswith("Web page 0")
    assert fake_hub["calls"] == [("allenai/c4", "en", "train", True)]
    assert fake_hub["pulled"] <= 6
    D.load_documents("c4@validation", max_docs=1)
    assert fake_hub["calls"][-1] == ("allenai/c4", "en", "validation", True)


def test_streamed_source_without_max_docs_stops(fake_hub, monkeypatch):
    monkeypatch.setattr(D_sources, "MAX_STREAMED_DOCS", 12)
    with pytest.warns(UserWarning, match="first 12 documents"):
        assert len(D.load_documents("c4")) == 12


def test_make_blocks_from_an_endless_stream(byt5, fake_hub):
    blocks = D.make_blocks(byt5, "c4", 4, 64, seed=3, cache_dir=False)
    assert blocks.shape == (4, 64)
    assert fake_hub["pulled"] < 300  # stopped near 4x the tokens needed
    assert fake_hub["shuffle"] == [3]
    heldout = D.make_blocks(byt5, "c4", 2, 64, split="heldout", cache_dir=False)
    numbers = re.findall(r"Web page (\d+) ", " ".join(byt5.decode(row) for row in heldout))
    assert numbers
    for number in map(int, numbers):  # every page seen is one the streamed rule holds out
        assert D_splits._in_streamed_split(_web_page(number), "heldout", 0.1)


def test_math_source(fake_hub):
    docs = D.load_documents("math", max_docs=7)
    assert docs[0] == "algebra problem 0\nanswer 0"
    assert {d.split(" problem")[0] for d in docs} == set(D_sources._MATH_CONFIGS)  # round-robin over subjects
    assert {c[0] for c in fake_hub["calls"]} == {"EleutherAI/hendrycks_math"}
    fake_hub["failing"].add("EleutherAI/hendrycks_math")
    docs = D.load_documents("math", max_docs=2)
    assert fake_hub["calls"][-1] == ("hendrycks/competition_math", None, "train", True)
    assert docs[0].startswith("None problem 0\n")
    fake_hub["failing"].add("hendrycks/competition_math")
    with pytest.raises(DataError, match="EleutherAI/hendrycks_math.*fallback.*hendrycks/competition_math"):
        D.load_documents("math", max_docs=2)


def test_generic_hub_source(fake_hub):
    assert D.load_documents("hf:org/code:python@test", text_field="content", max_docs=2) == ["code 0", "code 1"]
    assert fake_hub["calls"][-1] == ("org/code", "python", "test", True)
    with pytest.raises(DataError, match=r"no text field 'text' \(its fields: content\)"):
        D.load_documents("hf:org/code", max_docs=2)
    with pytest.raises(DataError, match="broken/ds.*Couldn't reach the hub"):
        D.load_documents("hf:broken/ds", max_docs=2)


def test_hub_source_without_datasets(byt5, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    for src in ("c4", "math", "hf:allenai/c4:en"):
        with pytest.raises(DataError, match=r"pip install hookmoe\[hub\]"):
            D.load_documents(src, max_docs=1)
    with pytest.raises(DataError, match="datasets"):
        D.make_blocks(byt5, "c4", 1, 8, cache_dir=False)


# -------------------------------------------------------------------------------------- batches


def test_iter_batches():
    blocks = torch.arange(10 * 3).reshape(10, 3)
    batches = list(D.iter_batches(blocks, 4, shuffle=True, seed=0))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    rows = torch.cat(batches)
    assert sorted(rows[:, 0].tolist()) == list(range(0, 30, 3))  # each row once
    assert not torch.equal(rows, blocks)  # shuffled
    again = list(D.iter_batches(blocks, 4, shuffle=True, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = torch.cat(list(D.iter_batches(blocks, 4, shuffle=True, seed=1)))
    assert not torch.equal(other, rows)
    resumed = list(D.iter_batches(blocks, 4, shuffle=True, seed=0, start=1))
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, batches[1:]))
    assert torch.equal(torch.cat(list(D.iter_batches(blocks, 4, shuffle=False, seed=0))), blocks)
    assert [b.shape[0] for b in D.iter_batches(blocks, 4, shuffle=False, seed=0, drop_last=True)] == [4, 4]
    assert list(D.iter_batches(blocks, 4, shuffle=True, seed=0, start=3)) == []
    assert D.num_batches(10, 4) == 3 and D.num_batches(10, 4, drop_last=True) == 2
    with pytest.raises(DataError):
        list(D.iter_batches(blocks, 4, shuffle=True, seed=0, start=4))
    with pytest.raises(DataError):
        list(D.iter_batches(blocks, 0, shuffle=True, seed=0))


# ------------------------------------------------------------------------------ multiple choice


def test_load_mc_jsonl(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"context": "The sky is", "choices": ["blue", "green"], "label": 0},
        {"question": "2+2=", "options": ["3", "4", "5"], "answer": "B"},
        {"query": "Pick:", "endings": ["x", "y"], "gold": 1},
        {"question": "ARC style?", "choices": {"text": ["no", "yes"], "label": ["1", "2"]}, "answerKey": "2"},
        {"ctx": "Text answer", "endings": ["left", "right"], "label": "right"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    items = D.load_mc(path)
    assert items[0] == MCItem("The sky is", ["blue", "green"], 0)
    assert [item.label for item in items] == [0, 1, 1, 1, 1]
    assert items[3].choices == ["no", "yes"]
    assert items[0].continuation(0) == " blue"
    assert MCItem("Q:\n", ["a", "b"], 0).continuation(1) == "b"


def test_load_mc_bigbench(tmp_path):
    task = {
        "name": "toy",
        "examples": [
            {"input": "Water is", "target_scores": {"dry": 0, "wet": 1, "loud": 0}},
            {"input": "Generative only", "target": "no choices"},
            {"input": "Fire is", "target_scores": {"hot": 1.0, "cold": 0.0}},
        ],
    }
    folder = tmp_path / "toy_task"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps(task), encoding="utf-8")
    items = D.load_mc(folder / "task.json")
    assert items == [MCItem("Water is", ["dry", "wet", "loud"], 1), MCItem("Fire is", ["hot", "cold"], 0)]
    assert D.load_mc(folder) == items


@pytest.mark.parametrize(
    "row,pattern",
    [
        ({"context": "c", "choices": ["only"], "label": 0}, "at least 2 choices"),
        ({"context": "c", "choices": ["a", "b"], "label": 2}, "not the index"),
        ({"context": "c", "choices": ["a", ""], "label": 0}, "non-empty"),
        ({"context": "", "choices": ["a", "b"], "label": 0}, "non-empty context"),
        ({"context": "c", "label": 0}, "no choices field"),
        ({"context": "c", "choices": ["a", "b"], "label": "maybe"}, "cannot read the label"),
    ],
)
def test_load_mc_rejects_bad_items(tmp_path, row, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        D.load_mc(path)
    assert "line 1" in str(info.value)


def test_load_mc_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        D.load_mc(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no multiple-choice items"):
        D.load_mc(empty)
    generative = tmp_path / "task.json"
    generative.write_text(json.dumps({"examples": [{"input": "a", "target": "b"}]}), encoding="utf-8")
    with pytest.raises(DataError, match="no multiple-choice items"):
        D.load_mc(generative)


def test_builtin_mc():
    items = D.builtin_mc(40, seed=0)
    assert len(items) == 40
    corpus = " ".join(" ".join(D.load_documents("builtin")).split())
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert (item.context + item.continuation(item.label)) in corpus
    assert D.builtin_mc(40, seed=0) == items
    assert D.builtin_mc(40, seed=1) != items
    assert len({item.label for item in items}) > 1  # the answer is not always in the same slot
    with pytest.raises(DataError, match="usable sentences"):
        D.builtin_mc(10**6, seed=0)
