"""Train / held-out splits by document, so calibration and evaluation never share a document."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING
from hookmoe.data.builtin import _dedupe, _text_hash
from hookmoe.data.sources import SPLITS
from hookmoe.errors import DataError



if TYPE_CHECKING:
    pass


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
            "blank lines, add files, or use --split all."
        )
    return DataError(
        f"The {split} split of '{src}' is empty ({n_documents} documents, heldout_fraction={fraction}); "
        "use more documents or another split."
    )
