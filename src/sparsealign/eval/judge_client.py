"""Asking the judge: an OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp's server)
through the ``openai`` client, with an on-disk cache of its answers.

Transport is the ``openai`` package's: the key goes as ``Authorization: Bearer <key>``; each request has a
timeout (``timeout`` seconds) and is retried up to ``max_retries`` times on connection errors, timeouts, 408,
409, 429 and 5xx, with exponential backoff (0.5 s · 2^attempt, at most 8 s, minus up to 25% jitter) or the
wait the server asks for in ``Retry-After``/``retry-after-ms`` (up to 2 minutes). Decoding is greedy
(temperature 0) with at most ``max_tokens`` tokens.

The API key is read from one environment variable (``OPENAI_API_KEY``, or the one named by
``--api-key-env``), is held in memory only, and is scrubbed from any error message shown. When
``OPENAI_API_KEY`` is unset, the placeholder ``EMPTY`` is sent, which local servers without authentication
accept; a variable named with ``--api-key-env`` must be set.

Cache: one JSON file per answered request, named by ``sha256`` of (judge model, the exact messages, the
decoding settings), under ``<cache>/<first two hex digits>/``. Every answered request is stored, including
replies that name no response (at temperature 0 the judge would say the same again); errors are not. A
rerun therefore sends only the requests that were never answered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsealign.errors import JudgeError
from sparsealign.io import atomic_write, cache_root, inside

__all__ = [
    "DEFAULT_KEY_ENV",
    "NO_KEY",
    "ChatJudge",
    "ComparisonError",
    "JudgmentCache",
    "ServerSettings",
    "default_cache_dir",
    "resolve_api_key",
]

log = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "EMPTY"
"""Sent as the key when ``OPENAI_API_KEY`` is unset (local servers without authentication)."""


class ComparisonError(Exception):
    """The server refused one request (400 or 422, e.g. a prompt longer than its context); that comparison
    is ``failed`` and the others go on."""


def default_cache_dir() -> Path:
    """``<sparsealign cache>/judge`` (``$SPARSEALIGN_CACHE/judge`` or ``~/.cache/sparsealign/judge``)."""
    return cache_root() / "judge"


def resolve_api_key(env_name: str | None) -> str:
    """The key from ``env_name`` (default ``OPENAI_API_KEY``). Unset ``OPENAI_API_KEY`` gives
    :data:`NO_KEY`, with a warning; an unset variable named explicitly is a :class:`JudgeError`."""
    name = env_name or DEFAULT_KEY_ENV
    key = os.environ.get(name)
    if key:
        return key
    if env_name and env_name != DEFAULT_KEY_ENV:
        raise JudgeError(f"--api-key-env {env_name}: the environment variable {env_name} is not set")
    log.warning("%s is not set: sending the placeholder key %r (fine for a local server)", name, NO_KEY)
    return NO_KEY


@dataclass(frozen=True)
class ServerSettings:
    """Where and how to ask: the server, the judge model, decoding and transport settings."""

    base_url: str
    judge: str
    api_key_env: str | None = None
    timeout: float = 60.0
    max_retries: int = 5
    max_tokens: int = 10


class JudgmentCache:
    """The judge's answers on disk, keyed by :meth:`key`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def key(judge: str, messages: list[dict[str, str]], max_tokens: int) -> str:
        """sha256 of the judge model, the exact messages and the decoding settings."""
        request = {"judge": judge, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        """``<folder>/<key[:2]>/<key>.json``; a key that would lead outside the folder is refused."""
        return inside(self.folder, f"{key[:2]}/{key}.json", "judge cache key", nested=True, error=JudgeError)

    def get(self, key: str) -> str | None:
        """The cached reply, or ``None`` (also for an unreadable entry, which is then asked again)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable judge cache entry %s", path)
            return None

    def put(self, key: str, judge: str, reply: str) -> None:
        """Store ``reply`` (atomically: a reader never sees half an entry)."""
        with atomic_write(self._path(key)) as handle:
            json.dump({"judge": judge, "reply": reply}, handle, ensure_ascii=False)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.json")) if self.folder.is_dir() else 0


class ChatJudge:
    """Sends judge requests (or answers them from the cache) and counts both; safe to share between
    threads."""

    def __init__(self, settings: ServerSettings, cache: JudgmentCache):
        try:
            import openai
        except ImportError:
            raise JudgeError("sparsealign judge needs the openai package: pip install openai") from None
        self.settings = settings
        self.cache = cache
        self._openai = openai
        self._key = resolve_api_key(settings.api_key_env)
        self._client = openai.OpenAI(
            api_key=self._key,
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
        )
        self._lock = threading.Lock()
        self.sent = 0
        self.from_cache = 0

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key != NO_KEY else text

    def ask(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """The judge's reply to ``messages`` and whether it came from the cache. A refused request (400/422)
        raises :class:`ComparisonError`; anything that makes every request fail (unreachable server, timeouts
        or 429/5xx after the retries, a refused key, an unknown model) raises :class:`JudgeError`."""
        settings = self.settings
        key = JudgmentCache.key(settings.judge, messages, settings.max_tokens)
        cached = self.cache.get(key)
        if cached is not None:
            with self._lock:
                self.from_cache += 1
            return cached, True
        reply = self._request(messages)
        self.cache.put(key, settings.judge, reply)
        with self._lock:
            self.sent += 1
        return reply, False

    def _request(self, messages: list[dict[str, str]]) -> str:
        openai, settings = self._openai, self.settings
        where = f"the judge server at {settings.base_url}"
        retries = f"after {settings.max_retries} retries"
        try:
            response: Any = self._client.chat.completions.create(
                model=settings.judge, messages=messages, temperature=0, max_tokens=settings.max_tokens
            )
        except openai.APITimeoutError:
            raise JudgeError(
                f"{where} did not answer within {settings.timeout:g} s, {retries} (raise --timeout?)"
            ) from None
        except openai.APIConnectionError as error:
            cause = self._scrub(str(error.__cause__ or error))
            raise JudgeError(
                f"cannot reach {where} {retries} ({cause}): is it running, and is --base-url right?"
            ) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            name = settings.api_key_env or DEFAULT_KEY_ENV
            raise JudgeError(
                f"{where} refused the API key (HTTP {error.status_code}): set {name} "
                "(or name another variable with --api-key-env)"
            ) from None
        except openai.NotFoundError:
            raise JudgeError(
                f"{where} has no model {settings.judge!r} or no /chat/completions (HTTP 404): "
                "check --judge and --base-url (which usually ends in /v1)"
            ) from None
        except openai.RateLimitError:
            raise JudgeError(f"{where} still rate-limits (HTTP 429) {retries}: lower --concurrency") from None
        except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
            raise ComparisonError(f"HTTP {error.status_code}: {self._scrub(str(error.message))}") from None
        except openai.APIStatusError as error:
            raise JudgeError(
                f"{where} answered HTTP {error.status_code} {retries}: {self._scrub(str(error.message))}"
            ) from None
        except openai.APIError as error:  # e.g. a reply that is not chat-completions JSON
            raise JudgeError(f"{where} gave an unusable answer: {self._scrub(str(error))}") from None
        choices = getattr(response, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        return (getattr(message, "content", None) or "") if message is not None else ""
