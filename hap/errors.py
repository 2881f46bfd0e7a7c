"""The library's own exceptions: each message says what is wrong and what to do.

The CLI prints ``str(error)`` as one line and exits non-zero; it never shows a
traceback for a ``HapError``.
"""

from __future__ import annotations


class HapError(Exception):
    """Base class of every error hap-circuits raises on purpose."""


class ModelNotFoundError(HapError):
    """The model name is neither built in, a local directory, nor on the hub."""


class UnsupportedArchitectureError(HapError):
    """The checkpoint's architecture has no adapter."""


class MissingModelPackageError(HapError):
    """The package that ships the default model's weights is not installed."""


class EmptyTokenizerError(HapError):
    """A tokenizer loaded without a vocabulary (typical of an offline hub load)."""


class DeviceNotAvailableError(HapError):
    """The requested torch device does not exist on this machine."""


class UnsupportedDtypeError(HapError):
    """The requested dtype is not one the adapters run in."""


class InvalidMaskError(HapError):
    """A mask or reference has the wrong shape or does not match the batch."""


class DataError(HapError):
    """Task data is malformed (lengths differ, answer not one token, empty, ...)."""


class WeakModelError(HapError):
    """The full model fails the task (at or below chance, or a negative mean metric): a circuit of it would
    explain a broken behaviour."""
