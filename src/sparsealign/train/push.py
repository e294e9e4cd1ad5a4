"""``sparsealign push RUN --repo-id NAME [--private]``: upload a run's ``final/`` (the model or the LoRA
adapter, with its model card) to the Hugging Face hub.

The token is whatever ``huggingface_hub`` finds itself: ``HF_TOKEN`` in the environment, else the login saved
by ``hf auth login``; sparsealign never reads it into a message, a log or a file. A run without a card
(trained before cards existed) gets one first (:func:`sparsealign.train.model_card.write_model_card`).
An offline machine (``HF_HUB_OFFLINE=1``, or a hub that does not answer) stops with one clear error before
anything is sent.
"""

from __future__ import annotations

from pathlib import Path

from sparsealign.errors import UserError
from sparsealign.hub import hub_offline_flag, hub_reachable
from sparsealign.train.model_card import CARD_FILE, write_model_card

__all__ = ["PushError", "push_run"]


class PushError(UserError, RuntimeError):
    """A run that cannot be pushed: no ``final/``, no token, no network, or the hub refused."""


def push_run(run: str | Path, repo_id: str, private: bool = False) -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload ``<run>/final`` to it; returns
    the commit's URL. ``private`` applies when the repository is created."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    final = Path(run) / "final"
    if not final.is_dir():
        raise PushError(
            f"'{run}' has no final/ folder: only a run trained to the end can be pushed "
            f"(continue an interrupted one with `sparsealign train {Path(run) / 'config.yaml'} train.resume=auto`)."
        )
    if not (final / CARD_FILE).is_file():
        write_model_card(run)
    if hub_offline_flag():
        raise PushError(
            "The hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): unset it to push."
        )
    if not hub_reachable():
        raise PushError(
            "The Hugging Face hub cannot be reached from this machine: push from one with network access "
            f"(copy {final} there), or check HF_ENDPOINT and the proxy settings."
        )
    if get_token() is None:
        raise PushError("No Hugging Face token: set HF_TOKEN or log in once with `hf auth login`.")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=final,
            repo_type="model",
            commit_message=f"Upload {final.parent.name} (trained with sparsealign)",
        )
    except OfflineModeIsEnabled as error:
        raise PushError(f"The hub is switched off: {error}") from error
    except HfHubHTTPError as error:
        raise PushError(f"The hub refused to push to '{repo_id}': {error}") from error
    except (HTTPError, OSError) as error:  # connection failures (the HTTP client's errors, or the OS's)
        raise PushError(f"Could not reach the hub to push to '{repo_id}': {error}") from error
    return str(getattr(commit, "commit_url", commit))
