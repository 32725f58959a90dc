"""Exceptions with messages meant for users: they name the file and what is wrong."""

from __future__ import annotations


class MagicFuseError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(MagicFuseError, ValueError):
    """A configuration (params.yaml section, checkpoint config) is invalid."""


class DataError(MagicFuseError, ValueError):
    """A data file or data set is missing, unreadable or inconsistent."""


class ImageReadError(DataError):
    """An image file cannot be read as an image."""


class CheckpointError(MagicFuseError, ValueError):
    """A checkpoint file is missing, corrupt or of the wrong kind."""


class TrainingError(MagicFuseError, RuntimeError):
    """Training cannot go on (for example a NaN loss)."""
