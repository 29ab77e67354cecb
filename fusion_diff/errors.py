"""Exceptions that name the offending file or setting and say how to fix it."""

from __future__ import annotations


class FusionDiffError(Exception):
    """Base class of every error this library raises on purpose."""


class DataError(FusionDiffError, ValueError):
    """An input file exists but its content is unusable (corrupt image, wrong schema, ...)."""


class MissingFileError(FusionDiffError, FileNotFoundError):
    """A file the job needs is not there."""


class ConfigError(FusionDiffError, ValueError):
    """A configuration has an unknown key, a wrong type or an impossible value."""


class CacheMismatchError(FusionDiffError, ValueError):
    """An on-disk cache was made by another backbone, captioner, dimension or generator."""


class FolderInUseError(FusionDiffError, RuntimeError):
    """Another live job is writing to the same output folder (it holds the folder's lock)."""


class TrainingDivergedError(FusionDiffError, ArithmeticError):
    """The training loss or the trained weights became NaN or infinite; nothing past the last good step is saved."""
