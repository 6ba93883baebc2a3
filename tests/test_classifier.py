"""brainml's classifier format without a gateway: the saved arrays predict exactly what scikit-learn predicts,
the split never puts chunks of one document on both sides, the registry refuses a damaged classifier, and
training in a child process (how the gateway trains) gives the same model, its progress, its errors, and stops
when the job is cancelled."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from bkg_kernel.errors import Cancelled, CorruptData, InvalidInput
from bkg_kernel.models.classifier import Classifier, split_by_group, train, train_in_child
from bkg_kernel.models.registry import ModelRegistry


def blobs(n_labels: int, per: int = 40, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_labels, dim)) * 3
    x = np.concatenate([c + rng.standard_normal((per, dim)) for c in centres]).astype(np.float32)
    labels = [f"l{i}" for i in range(n_labels) for _ in range(per)]
    groups = [f"doc{i}-{j // 4}" for i in range(n_labels) for j in range(per)]  # 4 chunks per document
    return x, labels, groups


@pytest.mark.parametrize(("model", "n_labels"), [("logistic", 2), ("logistic", 4), ("mlp", 2), ("mlp", 3)])
def test_saved_arrays_predict_like_sklearn(model: str, n_labels: int, tmp_path: Path) -> None:
    x, labels, groups = blobs(n_labels)
    seen: list[float] = []
    net, metrics = train(
        x, labels, groups, model=model, test_split=0.25, epochs=20, hidden=8, seed=1,
        progress=lambda f, m="": seen.append(f),
    )  # fmt: skip
    assert seen and seen[-1] <= 1.0 and seen == sorted(seen)
    assert metrics["accuracy"] > 0.9 and metrics["majority_baseline"] < 0.75
    assert sum(r["support"] for r in metrics["per_label"]) == metrics["test_examples"]
    net.info = {"embed_model": "candle:x", "dim": 16}
    net.save(tmp_path / "clf")
    back = Classifier.load(tmp_path / "clf")
    assert back.labels == net.labels and back.info["dim"] == 16
    p = back.predict_proba(x)
    assert p.shape == (len(x), n_labels) and np.allclose(p.sum(axis=1), 1)
    # the same model refitted by scikit-learn gives the same probabilities as the saved arrays
    from sklearn.linear_model import LogisticRegression

    if model == "logistic":
        tr, _ = split_by_group(np.asarray(labels), np.asarray(groups), 0.25, 1)
        ref = LogisticRegression(max_iter=20 * 20, C=10.0, random_state=1).fit(x[tr], np.asarray(labels)[tr])
        assert np.allclose(ref.predict_proba(x), p, atol=1e-3)


def test_split_keeps_documents_whole_and_tests_every_label() -> None:
    _, labels, groups = blobs(3)
    tr, te = split_by_group(np.asarray(labels), np.asarray(groups), 0.2, 0)
    g = np.asarray(groups)
    assert not set(g[tr]) & set(g[te])
    assert set(np.asarray(labels)[te]) == {"l0", "l1", "l2"}


def test_training_refuses_one_label() -> None:
    x, labels, groups = blobs(1)
    from bkg_kernel.errors import InvalidInput

    with pytest.raises(InvalidInput, match="at least 2 labels"):
        train(x, labels, groups, model="logistic", test_split=0.2, epochs=2, hidden=4, seed=0, progress=print)


def test_registry_detects_and_checks_classifiers(tmp_path: Path) -> None:
    x, labels, groups = blobs(2)
    net, _ = train(x, labels, groups, model="logistic", test_split=0.2, epochs=5, hidden=4, seed=0, progress=print)
    net.info = {"embed_model": "candle:x", "dim": 16, "metrics": {"accuracy": 1.0, "f1_macro": 1.0}}
    reg = ModelRegistry(tmp_path / "models", register_defaults=False)
    folder = tmp_path / "models" / "classifiers" / "c1"
    net.save(folder)
    entry = reg.add(folder)
    assert entry.kind == "classifier" and entry.meta["labels"] == ["l0", "l1"] and entry.meta["dim"] == 16
    broken = tmp_path / "models" / "classifiers" / "c2"
    net.save(broken)
    (broken / "weights.npz").write_bytes(b"not an npz")
    with pytest.raises(CorruptData, match="weights.npz"):
        reg.add(broken, kind="classifier")


def test_training_in_a_child_process_is_the_same_training() -> None:
    x, labels, groups = blobs(3)
    opts = {"model": "mlp", "test_split": 0.25, "epochs": 6, "hidden": 8, "seed": 3}
    here, _ = train(x, labels, groups, progress=lambda f, m="": None, **opts)
    seen: list[tuple[float, str]] = []
    net, metrics = train_in_child(x, labels, groups, progress=lambda f, m="": seen.append((f, m)), **opts)
    assert net.labels == here.labels and len(net.layers) == len(here.layers) == 2
    for (w, b), (w0, b0) in zip(net.layers, here.layers, strict=True):
        np.testing.assert_allclose(w, w0, rtol=1e-6)
        np.testing.assert_allclose(b, b0, rtol=1e-6)
    assert [f for f, _ in seen] == [(e + 1) / 6 for e in range(6)] and "epoch 6/6" in seen[-1][1]
    assert metrics["test_examples"] > 0 and len(metrics["curve"]) == 6
    assert not multiprocessing.active_children()


def test_a_child_process_error_and_a_cancel_reach_the_caller() -> None:
    x, labels, groups = blobs(2)
    with pytest.raises(InvalidInput) as bad:
        train_in_child(x, ["one"] * len(x), groups, progress=lambda f, m="": None, model="logistic",
                       test_split=0.25, epochs=2, hidden=8, seed=0)  # fmt: skip
    assert bad.value.field == "label_field" and "at least 2 labels" in bad.value.message

    def cancel(f: float, m: str = "") -> None:
        raise Cancelled("brainml.train was cancelled")

    with pytest.raises(Cancelled):
        train_in_child(x, labels, groups, progress=cancel, model="mlp", test_split=0.25, epochs=500, hidden=8, seed=0)
    assert not multiprocessing.active_children()  # stopped at the first progress, not left to run 500 epochs
