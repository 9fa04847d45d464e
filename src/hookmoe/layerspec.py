"""Layer lists as users type them: ``14``, ``14,15``, ``12-14`` (inclusive ranges), mixed (``2,4-6``).

The one parser behind ``--layer``, ``--hook-layer``, ``--hook-candidates`` and the Python APIs that take layer
lists; errors name the flag.
"""

from __future__ import annotations

from hookmoe.errors import UserError


def parse_layer_list(text: str, what: str = "--layer", error: type[UserError] = UserError) -> list[int]:
    """Layer numbers in ``text`` in the order given (ranges expanded); raises ``error`` naming ``what``."""
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError(part)
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise error(f"{what} takes layer numbers like 14, a list 14,15 or a range 12-14; got '{text}'") \
                from None
    return out
