"""The base class of errors caused by the user's input rather than by a bug.

Config, data, model, checkpoint and reward errors derive from :class:`UserError`; the command line prints
their message (which says what is wrong and what to do) without a traceback and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config key, a data file, a model name, a checkpoint of another run, ..."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
