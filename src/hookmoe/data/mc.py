"""Multiple-choice items: loaded from JSON/JSONL (common field names, BIG-bench ``task.json``), or built offline from
held-out sentences (:func:`builtin_mc`)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hookmoe.data.sources import jsonl_records, _as_int, _file_kind, _open_text, _rng, load_documents
from hookmoe.data.splits import split_documents
from hookmoe.errors import DataError


if TYPE_CHECKING:
    pass


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
        for number, record in jsonl_records(file):
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
            f"with {n_choices} choices; ask for fewer items or use --split all."
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
