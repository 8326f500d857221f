"""The decision rule of a classifier, written once: which class, and how close it came to another.

A model decides by argmax, or, for a binary model with an operating point chosen on validation
({"positive": label, "value": p}), "positive when p(positive) >= value". The *margin* of a
decision is how far the probabilities are from changing it: top-1 minus top-2 probability under
argmax, |p(positive) - value| under a threshold. An int8 model whose margin is below the largest
margin error it showed against the float model on validation may answer differently from the
float model: that is its uncertain band (`uncertain_margin` in the model's metadata).
"""

from __future__ import annotations

import numpy as np


def positive_index(labels, positive=None) -> int:
    """The column of a binary task's positive class: a label or an index (default: the second)."""
    if len(labels) != 2:
        raise ValueError(f"an operating point needs a binary task, got {len(labels)} classes")
    if positive is None:
        return 1
    if isinstance(positive, (int, np.integer)) and not isinstance(positive, bool):
        return int(positive)
    names = [str(label) for label in labels]
    if str(positive) not in names:
        raise ValueError(f"positive label {positive!r} is not one of {names}")
    return names.index(str(positive))


def decisions(probs, operating_point=None, labels=None) -> np.ndarray:
    """Class index per row of an N x C probability array (`labels` name the columns; needed to
    find a positive class given by name)."""
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    if operating_point is None:
        return probs.argmax(axis=1)
    pos = positive_index(labels if labels is not None else range(probs.shape[1]), operating_point["positive"])
    if probs.shape[1] != 2:
        raise ValueError(f"a threshold needs a binary task, got {probs.shape[1]} classes")
    return np.where(probs[:, pos] >= operating_point["value"], pos, 1 - pos)


def margins(probs, operating_point=None, labels=None) -> np.ndarray:
    """How far each row's probabilities are from changing its decision."""
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    if operating_point is None:
        top = np.sort(probs, axis=1)
        return top[:, -1] - (top[:, -2] if probs.shape[1] > 1 else 0.0)
    pos = positive_index(labels if labels is not None else range(probs.shape[1]), operating_point["positive"])
    return np.abs(probs[:, pos] - operating_point["value"])


def margin_errors(reference, probs, operating_point=None, labels=None) -> np.ndarray:
    """Per row, how much the model's margins differ from the reference model's on the same image:
    under argmax, the largest change of p[top-1] - p[j] over the other classes j (top-1 of
    `probs`); under a threshold, the change of p(positive). A decision whose margin exceeds its
    margin error is the reference's decision too."""
    reference = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    if operating_point is not None:
        pos = positive_index(labels if labels is not None else range(probs.shape[1]), operating_point["positive"])
        return np.abs(probs[:, pos] - reference[:, pos])
    rows = np.arange(len(probs))
    top = probs.argmax(axis=1)
    gaps = probs[rows, top][:, None] - probs
    ref_gaps = reference[rows, top][:, None] - reference
    change = np.abs(gaps - ref_gaps)
    change[rows, top] = 0.0
    return change.max(axis=1)


def uncertain(probs, uncertain_margin, operating_point=None, labels=None) -> np.ndarray:
    """True where a decision falls inside the model's uncertain band (never without a band)."""
    m = margins(probs, operating_point, labels)
    if uncertain_margin is None:
        return np.zeros(len(m), dtype=bool)
    return m < uncertain_margin
