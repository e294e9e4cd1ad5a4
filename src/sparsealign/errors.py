"""Every error sparsealign raises on purpose: bad input from the user, as opposed to a bug.

Each class derives from :class:`UserError`; the command line prints its message (which says what is wrong
and what to do) without a traceback and exits with status 2. The modules that raise them re-export them
(``sparsealign.config.ConfigError``, ``sparsealign.models.loading.ModelError``, ...). This module is the
lowest layer: it imports nothing.
"""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "JudgeError",
    "MethodError",
    "ModelError",
    "RewardError",
    "RunFolderError",
    "SAEError",
    "TrainingError",
    "UserError",
]


class UserError(Exception):
    """Bad input: a config key, a data file, a model name, a checkpoint of another run, ..."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the configuration schema."""


class DataError(UserError, ValueError):
    """Data that cannot be read or used: a missing file, an unknown format, no usable rows, a bad template.

    The message always says what was wrong and where (a path, a column, or a ``file:line`` origin), and
    what to change (usually a ``data.*`` config key).
    """


class MethodError(UserError, ValueError):
    """A method (or user plugin) that cannot be found or used: an unknown name, a file that does not import,
    a module without the named object."""


class ModelError(UserError, RuntimeError):
    """A model or tokenizer that cannot be loaded or saved; the message says how to fix it."""


class SAEError(UserError):
    """A pretrained SAE cannot be found or loaded (missing file or key, wrong shape, unsupported option)."""


class JudgeError(UserError, RuntimeError):
    """A judge server (``sparsealign judge``) that cannot be reached, refuses the key or the model, or keeps
    failing after its retries; judgments already answered stay cached."""


class RewardError(UserError, RuntimeError):
    """A reward model that cannot be loaded or used (missing files, no network, bad label index)."""


class CacheError(UserError, RuntimeError):
    """A reference cache that is missing, unreadable or does not match the run."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or from another run."""


class TrainingError(UserError, RuntimeError):
    """A run that cannot start or continue, with the reason."""


class PluginError(UserError, ValueError):
    """A user's ``path/to/file.py:name`` or ``package.module:name`` that cannot be imported or found."""


class RunFolderError(UserError, RuntimeError):
    """A run folder that cannot be used: not a folder, held by another run, or holding another run's
    results (``train.overwrite=true`` or ``train.resume=auto`` says what to do with them)."""
