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


class SearchError(UserError):
    """A sweep, search, comparison or pipeline cannot run with the given input."""


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, bad settings, a checkpoint that does not fit)."""


class DataError(UserError):
    """Bad data input (unknown source, missing file, too little text, ...); the message is one sentence.

    A :class:`~hookmoe.errors.UserError`, hence a ``ValueError``.
    """


class EvalError(UserError):
    """An evaluation cannot run with the given input."""


class BenchError(UserError):
    """A benchmark option is invalid for this model or machine."""


class RuntimeOptionError(UserError):
    """A runtime option cannot be honoured (e.g. compile on a device without a compiler)."""


class ConversionError(UserError):
    """A dense model cannot be converted into an MoE with the given settings (CMoE)."""


class AllocationError(UserError):
    """An allocator cannot produce a plan for the given input."""


class FrontierError(UserError):
    """The frontier cannot run with the given input."""
