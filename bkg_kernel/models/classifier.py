"""Text classifiers on a collection's embeddings: train with scikit-learn, keep as plain arrays, predict with numpy.

A trained model is a folder `<model_dir>/classifiers/<id>/` with `weights.npz` (the layers) and
`classifier.json` (labels, embedding model, architecture, metrics). No pickle: loading a model never runs code.
Logistic regression is a network without hidden layers, so both architectures share one forward pass.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bkg_kernel.errors import BkgError, CorruptData, InvalidInput, error_data, from_dict

FORMAT = "bkg-classifier/1"
Progress = Callable[..., None]


@dataclass
class Classifier:
    """Layers (weights, biases) with ReLU between them; the output is a sigmoid (2 labels) or a softmax."""

    labels: list[str]
    layers: list[tuple[np.ndarray, np.ndarray]]
    info: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Return an (n, len(labels)) array of probabilities."""
        h = np.asarray(x, dtype=np.float64)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        if h.shape[1] == 1:  # binary: one logit for labels[1]
            p1 = 1.0 / (1.0 + np.exp(-h[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        h = h - h.max(axis=1, keepdims=True)
        e = np.exp(h)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, folder: Path) -> None:
        """Write weights.npz and classifier.json into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"w{i}": w for i, (w, _) in enumerate(self.layers)}
        arrays.update({f"b{i}": b for i, (_, b) in enumerate(self.layers)})
        np.savez(folder / "weights.npz", **arrays)  # type: ignore[arg-type]
        meta = {"format": FORMAT, "labels": self.labels, "layers": len(self.layers), **self.info}
        (folder / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Classifier:
        """Read a saved classifier; raise `CorruptData` naming what is wrong."""
        try:
            meta = json.loads((folder / "classifier.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptData(
                f"{folder.name}: classifier.json is missing or not JSON ({exc})", field="model_id"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptData(f"{folder.name} is not a {FORMAT} classifier", field="model_id")
        labels = meta.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise CorruptData(f"{folder.name}: classifier.json lists no labels", field="model_id")
        try:
            with np.load(folder / "weights.npz", allow_pickle=False) as z:
                layers = [(z[f"w{i}"], z[f"b{i}"]) for i in range(int(meta["layers"]))]
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise CorruptData(f"{folder.name}: weights.npz is unreadable ({exc})", field="model_id") from None
        info = {k: v for k, v in meta.items() if k not in ("format", "labels", "layers")}
        return cls(list(labels), layers, info)


def split_by_group(
    labels: np.ndarray, groups: np.ndarray, test_split: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train / test masks; all rows of a group (a document's chunks) fall on the same side.

    Per label, `test_split` of its groups (at least one when it has two or more) go to the test side, so every
    label with enough documents is tested and chunks of one document never leak across the split.
    """
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for lab in np.unique(labels):
        gs = np.unique(groups[labels == lab])
        if len(gs) < 2:
            continue
        rng.shuffle(gs)
        n_test = min(len(gs) - 1, max(1, round(test_split * len(gs))))
        test |= np.isin(groups, gs[:n_test]) & (labels == lab)
    return ~test, test


def train(
    x: np.ndarray,
    labels: list[str],
    groups: list[str],
    *,
    model: str,
    test_split: float,
    epochs: int,
    hidden: int,
    seed: int,
    progress: Progress,
) -> tuple[Classifier, dict[str, Any]]:
    """Fit a logistic regression or an MLP; return it with metrics measured on the held-out documents."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
    from sklearn.neural_network import MLPClassifier

    y_all, g_all = np.asarray(labels), np.asarray(groups)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InvalidInput(f"training needs at least 2 labels; the collection has {classes}", field="label_field")
    tr, te = split_by_group(y_all, g_all, test_split, seed)
    if not te.any():
        raise InvalidInput(
            "no label has 2 or more documents, so nothing can be held out for testing", field="test_split"
        )
    xtr, ytr, xte, yte = x[tr], y_all[tr], x[te], y_all[te]
    t0 = time.perf_counter()
    clf: Any
    curve: list[dict[str, Any]] = []  # per epoch (logistic: per round): loss where there is one, and accuracies

    def point(epoch: int, loss: float | None) -> None:
        train_acc, test_acc = round(float(clf.score(xtr, ytr)), 4), round(float(clf.score(xte, yte)), 4)
        loss_v = None if loss is None else round(float(loss), 5)
        curve.append({"epoch": epoch, "loss": loss_v, "train_accuracy": train_acc, "test_accuracy": test_acc})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if model == "logistic":
            clf = LogisticRegression(max_iter=20, warm_start=True, C=10.0, random_state=seed)
            for step in range(epochs):
                clf.fit(xtr, ytr)
                point(step + 1, None)
                progress((step + 1) / epochs, f"logistic regression: {20 * (step + 1)} lbfgs iterations")
                if int(np.max(clf.n_iter_)) < 20:  # converged
                    break
            layers = [(clf.coef_.T.copy(), clf.intercept_.copy())]
        else:
            clf = MLPClassifier(
                hidden_layer_sizes=(hidden,), alpha=1e-4, random_state=seed, learning_rate_init=3e-3,
                batch_size=min(32, len(xtr)),
            )  # fmt: skip
            order = np.random.default_rng(seed)
            for epoch in range(epochs):
                idx = order.permutation(len(xtr))
                clf.partial_fit(xtr[idx], ytr[idx], classes=classes)
                point(epoch + 1, clf.loss_)
                progress((epoch + 1) / epochs, f"mlp: epoch {epoch + 1}/{epochs}, loss {clf.loss_:.4f}")
            layers = [(w.copy(), b.copy()) for w, b in zip(clf.coefs_, clf.intercepts_, strict=True)]
    fitted = [str(c) for c in clf.classes_]
    net = Classifier(fitted, layers)
    pred = np.asarray(fitted)[net.predict_proba(xte).argmax(axis=1)]  # the saved arrays, not sklearn, are scored
    p, r, f, s = precision_recall_fscore_support(yte, pred, labels=fitted, zero_division=0)
    majority = max(classes, key=lambda c: int((ytr == c).sum()))
    # A label with one document is never held out (`split_by_group`): it has no test examples, so its precision,
    # recall and F1 are unknown (null), not 0, and the macro F1 averages the tested labels only.
    tested = [lab for i, lab in enumerate(fitted) if s[i] > 0]
    metrics = {
        "accuracy": float(accuracy_score(yte, pred)),
        "f1_macro": float(f1_score(yte, pred, labels=tested, average="macro", zero_division=0)),
        "labels_tested": len(tested),
        "labels_total": len(fitted),
        "majority_baseline": float(np.mean(yte == majority)),
        "train_examples": int(tr.sum()),
        "test_examples": int(te.sum()),
        "train_documents": len(set(g_all[tr])),
        "test_documents": len(set(g_all[te])),
        "per_label": [
            _label_row(lab, float(p[i]), float(r[i]), float(f[i]), int(s[i])) for i, lab in enumerate(fitted)
        ],
        "confusion": confusion_matrix(yte, pred, labels=fitted).tolist(),
        "curve": curve,
        "train_seconds": round(time.perf_counter() - t0, 3),
    }
    return net, metrics


def _label_row(label: str, precision: float, recall: float, f1: float, support: int) -> dict[str, Any]:
    """One label's held-out metrics; null, and `tested` false, for a label with no held-out examples."""
    if support == 0:
        return {"label": label, "precision": None, "recall": None, "f1": None, "support": 0, "tested": False}
    return {"label": label, "precision": precision, "recall": recall, "f1": f1, "support": support, "tested": True}


def tested_labels(metrics: dict[str, Any]) -> str:
    """Say which labels a macro F1 averages: "the 5 labels", or "4 of 6 labels (2 not tested: ...)"."""
    rows = metrics["per_label"]
    tested = metrics.get("labels_tested", sum(1 for r in rows if r["support"]))
    if tested == len(rows):
        return f"the {tested} labels"
    return f"{tested} of {len(rows)} labels ({len(rows) - tested} not tested: no held-out chunks)"


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


TRAIN_NICE = 5  # like a plugin worker: under contention the scheduler favours the process that answers requests


def train_in_child(
    x: np.ndarray, labels: list[str], groups: list[str], *, progress: Progress, **opts: Any
) -> tuple[Classifier, dict[str, Any]]:
    """`train` in a spawned child process, so scikit-learn never loads into (or holds the GIL of) the caller: the
    gateway, where brainml runs. Progress comes back over a pipe as it happens; an exception raised by `progress`
    (a cancelled job) stops the child at once; the child's error arrives as the same `BkgError`."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    args = (there, x, labels, groups, opts, os.getpid())
    proc = ctx.Process(target=_train_child, args=args, name="bkg-train", daemon=True)
    proc.start()
    there.close()
    try:
        while True:
            try:
                kind, *rest = here.recv()
            except EOFError:
                proc.join(5)
                raise BkgError(f"the training process exited (code {proc.exitcode}) before it finished") from None
            if kind == "progress":
                progress(*rest)
            elif kind == "done":
                return rest[0], rest[1]
            else:
                raise from_dict(rest[0])
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(5)
        here.close()


def _train_child(
    conn: Any, x: np.ndarray, labels: list[str], groups: list[str], opts: dict[str, Any], parent: int
) -> None:
    with contextlib.suppress(OSError):
        os.nice(TRAIN_NICE)
    # its parent (the gateway) may die without a word, even by SIGKILL: training for nobody would go on otherwise
    threading.Thread(target=_exit_with, args=(parent,), name="bkg-orphan-watch", daemon=True).start()
    try:
        net, metrics = train(x, labels, groups, progress=lambda f, m="": conn.send(("progress", f, m)), **opts)
        conn.send(("done", net, metrics))
    except Exception as exc:
        conn.send(("error", error_data(exc, code="training_failed")))
    finally:
        conn.close()
