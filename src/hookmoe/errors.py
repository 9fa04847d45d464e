"""User-facing errors.

Every error a user can cause by what they type (a bad model spec, a malformed plan, missing data, a hook
trained for another model) is a :class:`UserError`. The CLI prints its message as one line and exits
with status 2; library users catch it like any ``ValueError``.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message is one self-explanatory sentence."""


class ModelError(UserError):
    """The model spec cannot be loaded or is not a supported MoE."""


class PlanError(UserError):
    """A routing plan is malformed or does not fit the model."""


class ArtifactError(UserError):
    """A hook artifact is missing, corrupt, or was made for another model."""
