"""Reward models that score texts, for on-policy preference pairs and the final generation report.

``load_reward(cfg)`` returns a :class:`RewardModel`: ``imdb-sentiment`` (offline TF-IDF + logistic
regression on IMDB, cached) or a hub id / local folder of a sequence classifier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsealign.rewards.base import RewardError, RewardModel, reward_fingerprint

if TYPE_CHECKING:
    from sparsealign.config import RewardConfig


def load_reward(cfg: RewardConfig) -> RewardModel:
    """Build the reward named by ``cfg.name``.

    Raises :class:`RewardError` when a classifier cannot be loaded (no network and no local copy).
    """
    from sparsealign.rewards.sentiment import SENTIMENT_NAME, ClassifierReward, load_sentiment

    if cfg.name == SENTIMENT_NAME:
        return load_sentiment()
    return ClassifierReward(cfg.name, positive_label=cfg.positive_label, batch_size=cfg.batch_size)


__all__ = ["RewardError", "RewardModel", "load_reward", "reward_fingerprint"]
