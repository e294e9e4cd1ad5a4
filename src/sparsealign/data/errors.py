"""The one exception type of the data pipeline."""

from __future__ import annotations

from sparsealign.errors import UserError


class DataError(UserError, ValueError):
    """Data that cannot be read or used: a missing file, an unknown format, no usable rows, a bad template.

    The message always says what was wrong and where (a path, a column, or a ``file:line`` origin), and
    what to change (usually a ``data.*`` config key).
    """
