"""The built-in digits models' objective check: does a classifier still read the digit a generation was prompted
for? A logistic regression on scikit-learn's bundled 8x8 digits (97 % held-out accuracy; no download)."""

from __future__ import annotations

import numpy as np

# The built-in models whose generations are digits this reader reads (the variants of builtin:digits draw the same
# digits, bolder or in fewer steps).
DIGIT_MODELS = ("digits", "wan-digits", "digits-lora", "digits-4step", "digits-8step")


def digit_classifier():
    """A logistic regression on sklearn's digits (97 % held-out accuracy): an objective 'is it legible' check."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    return LogisticRegression(max_iter=2000).fit(data.data, data.target)


def classify(classifier, images) -> np.ndarray:
    flat = np.stack([np.asarray(img, dtype=np.float64).reshape(-1) for img in images]) / 255.0 * 16.0
    return classifier.predict(flat)


def builtin_name(model: str | None, pipe) -> str | None:
    """``"digits"`` / ``"wan-digits"`` / a variant's name for the built-in models (by ``--model`` or by the pipeline's class), else None."""
    if model and model.startswith("builtin:"):
        return model.split(":", 1)[1]
    cls = type(pipe).__name__
    by_class = {"DigitsPipeline": "digits", "FewStepDigitsPipeline": "digits", "WanDigitsPipeline": "wan-digits"}
    return by_class.get(cls)


def digit_reader(builtin: str | None):
    """``read(planes) -> digit`` for the built-in digits models (None for other models): a logistic regression on
    scikit-learn's digits (:func:`digit_classifier`); for the 12x12 video frames, each frame's 8x8 window with the
    most ink is read and the video's digit is the frames' majority."""
    if builtin not in DIGIT_MODELS:
        return None
    clf = digit_classifier()

    def crop(frame):
        if frame.shape == (8, 8):
            return frame
        best, where = -1.0, (0, 0)
        for i in range(frame.shape[0] - 7):
            for j in range(frame.shape[1] - 7):
                ink = float(frame[i:i + 8, j:j + 8].sum())
                if ink > best:
                    best, where = ink, (i, j)
        return frame[where[0]:where[0] + 8, where[1]:where[1] + 8]

    def read(planes: np.ndarray) -> int:
        labels = classify(clf, [crop(p) for p in planes])
        return int(np.bincount(labels, minlength=10).argmax())

    return read
