"""Nothing the package loads can run code: no pickle, safe ``torch.load``/``np.load``, warned remote code.

Issue 14 item 6. The package is scanned with :mod:`ast` (so comments and docstrings that mention pickle do
not count); the sentiment reward's cache is opened and checked to be plain npz + JSON; the reward rebuilt
from those arrays scores like the fitted scikit-learn pipeline; a checkpoint's optimizer, scheduler and RNG
files load with ``weights_only=True``.
"""

from __future__ import annotations

import ast
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsealign
from sparsealign.config import ModelConfig
from sparsealign.errors import CheckpointError
from sparsealign.models.builtins import build_tiny_llama
from sparsealign.models.loading import load_tokenizer
from sparsealign.rewards import sentiment
from sparsealign.rewards.sentiment import SENTIMENT_PARAMS, SentimentReward, fit_pipeline
from sparsealign.train.checkpoint import _load_tensors, rng_state, set_rng_state

PACKAGE = Path(sparsealign.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "joblib", "dill", "cloudpickle", "shelve", "marshal"}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str) -> list[str]:
    """Each import of a pickle-like module, ``torch.load`` without ``weights_only=True``, ``np.load``
    without ``allow_pickle=False`` and ``read_pickle`` call in ``source``, as ``line: what``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            attr = node.func.attr
            if attr == "load" and owner == "torch" and not _is_constant(_keyword(node, "weights_only"), True):
                found.append(f"{node.lineno}: torch.load without weights_only=True")
            elif (
                attr == "load"
                and owner in {"np", "numpy"}
                and not _is_constant(_keyword(node, "allow_pickle"), False)
            ):
                found.append(f"{node.lineno}: {owner}.load without allow_pickle=False")
            elif attr in {"read_pickle", "to_pickle"}:
                found.append(f"{node.lineno}: {owner}.{attr}")
    return found


def test_the_scanner_catches_each_unsafe_form():
    source = (
        "import pickle\nimport joblib as j\nfrom dill import loads\nimport torch, numpy as np, pandas as pd\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\nnp.load('a')\nnp.load('a', allow_pickle=True)\n"
        "pd.read_pickle('a')\n"
        "torch.load('a', weights_only=True)\nnp.load('a', allow_pickle=False)\n"
    )
    assert [line.split(":")[0] for line in unsafe_loads(source)] == [str(i) for i in range(1, 10) if i != 4]


def test_no_pickle_is_loaded_anywhere_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [f"{f.relative_to(PACKAGE)}:{hit}" for f in files for hit in unsafe_loads(f.read_text())]
    assert found == []


TEXTS = [
    "a wonderful film, great acting and a great story",
    "awful, boring and a waste of time",
    "great fun, I loved it",
    "bad plot, bad acting, boring",
    "wonderful music and good jokes",
    "the worst film I have seen, awful",
    "good film, loved the story",
    "boring and bad, a waste",
]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]
UNSEEN = ["great story but boring music", "loved it", "nothing in the vocabulary here", ""]


@pytest.fixture
def fitted():
    params = {**SENTIMENT_PARAMS, "min_df": 1, "max_df": 1.0}
    vectorizer, classifier = fit_pipeline(TEXTS, LABELS, params)
    return vectorizer, classifier, params


def test_reward_rebuilt_from_arrays_scores_like_the_fitted_pipeline(fitted, tmp_path):
    vectorizer, classifier, params = fitted
    expected = classifier.decision_function(vectorizer.transform(TEXTS + UNSEEN))
    assert expected[0] > 0 > expected[1] and expected[-1] == pytest.approx(classifier.intercept_[0])
    reward = SentimentReward.from_fitted(vectorizer, classifier, params, "abc", 0.9)
    np.testing.assert_allclose(reward.score(TEXTS + UNSEEN), expected, rtol=0, atol=1e-6)

    reward.save(tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["arrays.npz", "meta.json"]
    again = SentimentReward.load(tmp_path / "cache", batch_size=3)  # several batches
    assert (again.fingerprint, again.accuracy, again.params) == ("abc", 0.9, params)
    np.testing.assert_allclose(again.score(TEXTS + UNSEEN), expected, rtol=0, atol=1e-6)


def _assert_no_pickle(folder: Path) -> None:
    """Every file is JSON or an npz whose members are plain ``.npy`` arrays of a non-object dtype."""
    for file in folder.rglob("*"):
        if file.suffix == ".json":
            json.loads(file.read_text())
        elif file.suffix == ".npz":
            with zipfile.ZipFile(file) as archive:
                for member in archive.namelist():
                    assert member.endswith(".npy")
                    with archive.open(member) as handle:
                        version = np.lib.format.read_magic(handle)
                        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                        _, _, dtype = (read or np.lib.format.read_array_header_2_0)(handle)
                        assert not dtype.hasobject, (file, member)
            with np.load(file, allow_pickle=False) as data:
                assert all(data[key].dtype != object for key in data.files)
        else:
            raise AssertionError(f"unexpected file in the reward cache: {file}")


def test_reward_cache_holds_no_pickle_and_old_pickle_caches_are_never_read(fitted, tmp_path, monkeypatch):
    vectorizer, classifier, params = fitted
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(sentiment, "_sentiment_key", lambda: "k1")
    fits: list[int] = []

    def fake_fit(batch_size: int = 1024) -> SentimentReward:
        fits.append(batch_size)
        return SentimentReward.from_fitted(vectorizer, classifier, params, "k1", 0.9, batch_size)

    monkeypatch.setattr(sentiment, "fit_sentiment", fake_fit)
    # A pickle under the old (format 1) name: a booby trap that must never be opened.
    rewards = tmp_path / "rewards"
    rewards.mkdir()
    (rewards / "imdb-sentiment-k0.pkl").write_bytes(b"\x80\x04 not really a pickle")
    (rewards / "imdb-sentiment-k1.pkl").write_bytes(b"\x80\x04 not really a pickle")

    first = sentiment.load_sentiment()
    assert fits == [1024]
    _assert_no_pickle(rewards / "imdb-sentiment-k1")
    second = sentiment.load_sentiment()
    assert fits == [1024]  # loaded from the arrays, not refitted
    assert second.score(UNSEEN) == first.score(UNSEEN)

    (rewards / "imdb-sentiment-k1" / "arrays.npz").write_bytes(b"garbage")  # corrupt: refit, not crash
    sentiment.load_sentiment()
    assert fits == [1024, 1024]
    _assert_no_pickle(rewards / "imdb-sentiment-k1")


def test_cache_key_changed_with_the_array_format():
    assert SENTIMENT_PARAMS["format"] == 2


def test_checkpoint_state_files_load_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    np.random.seed(7)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    torch.save(rng_state(), tmp_path / "rng-0.pt")
    expected = np.random.randn(3)
    assert _load_tensors(tmp_path / "optimizer.pt")["state"][0]["step"] == 1
    assert _load_tensors(tmp_path / "scheduler.pt")["last_epoch"] == 1
    set_rng_state(_load_tensors(tmp_path / "rng-0.pt"))
    np.testing.assert_array_equal(np.random.randn(3), expected)

    torch.save({"numpy": np.random.get_state()}, tmp_path / "old.pt")  # what older versions wrote
    with pytest.raises(CheckpointError, match="weights_only=True"):
        _load_tensors(tmp_path / "old.pt")


def test_trust_remote_code_is_warned(tmp_path, caplog):
    model, tokenizer = build_tiny_llama(0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sparsealign.models.loading"):
        load_tokenizer(ModelConfig(name=str(tmp_path)))
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="sparsealign.models.loading"):
        load_tokenizer(ModelConfig(name=str(tmp_path), trust_remote_code=True))
    assert "model.trust_remote_code=true" in caplog.text and str(tmp_path) in caplog.text


def test_a_pickled_bin_checkpoint_is_refused(tmp_path) -> None:
    """Weights load from safetensors only: a folder holding only pytorch_model.bin is a clear ModelError."""
    import torch

    from sparsealign.config import ModelConfig
    from sparsealign.errors import ModelError
    from sparsealign.models.builtins import build_tiny_llama
    from sparsealign.models.loading import load_model

    model, tokenizer = build_tiny_llama(0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for file in tmp_path.glob("*.safetensors"):  # the same weights as a pickled checkpoint
        file.unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / "pytorch_model.bin").is_file() and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ModelError, match="safetensors only"):
        load_model(ModelConfig(name=str(tmp_path)))
    model.save_pretrained(tmp_path)  # now with model.safetensors: loads, same weights
    loaded, _ = load_model(ModelConfig(name=str(tmp_path)))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_secrets_in_the_environment_are_never_written(tmp_path, monkeypatch, caplog, capsys) -> None:
    """A run with fake keys in the environment (hub token, OpenAI, W&B) writes them nowhere: not in config.yaml,
    metrics, checkpoints, final/, the report page, the model card, the cache, the logs or the console."""
    import logging

    from tiny_models import train_smoke

    secrets = {
        "HF_TOKEN": "hf_FAKEsecretTOKEN0123456789",
        "HUGGING_FACE_HUB_TOKEN": "hf_FAKEsecretLEGACY987654321",
        "OPENAI_API_KEY": "sk-FAKEsecretOPENAI0123456789",
        "WANDB_API_KEY": "FAKEsecretWANDB0123456789abcdef",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.DEBUG)
    run = train_smoke(tmp_path / "run", "eval.generate=true", "train.save_every=1")
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "index.html" for path in written) and any(p.name == "README.md" for p in written)
    assert (run / "checkpoints").is_dir()
    captured = capsys.readouterr()
    for value in secrets.values():
        needle = value.encode()
        leaked = [str(path) for path in written if needle in path.read_bytes()]
        assert not leaked, f"{value} written to {leaked}"
        assert value not in caplog.text and value not in captured.out and value not in captured.err
