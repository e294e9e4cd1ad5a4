"""Whether the Hugging Face hub can be used: switched off by the user, or not answering.

Loaders ask :func:`hub_reachable` before a download and switch to the local Hugging Face cache when it is
False, so an offline machine fails at once with a message saying what to download instead of retrying for
half a minute. This module is the lowest layer: it imports nothing from sparsealign and nothing heavy.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from functools import lru_cache

__all__ = ["hub_offline_flag", "hub_reachable"]

_TRUE = {"1", "true", "yes", "on"}


def hub_offline_flag() -> bool:
    """True when the user switched the hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float) -> bool:
    try:
        request = urllib.request.Request(endpoint, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout):  # honours *_PROXY environment variables
            return True
    except urllib.error.HTTPError:
        return True  # the server answered, only not with 2xx
    except (OSError, ValueError):
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be used: not switched off, and answering within ``timeout`` seconds.

    A failed probe is remembered for the rest of the process, so an unreachable hub costs at most one
    ``timeout`` (transformers itself would retry for about half a minute before failing).
    """
    if hub_offline_flag():
        return False
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"), timeout)
