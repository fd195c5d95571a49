"""Scenario tagger: TF-IDF + logistic regression (scikit-learn), trained on the labelled train split only.

It labels every ``lm.txt`` sentence with a SLURP scenario so that pretraining text can leave out the
scenarios a study holds out as targets.
"""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, make_pipeline


def build_tagger(C: float = 10.0, seed: int = 0):
    features = FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
    ])
    return make_pipeline(features, LogisticRegression(C=C, max_iter=2000, random_state=seed))


def train_tagger(texts: list[str], scenarios: list[str], C: float = 10.0, seed: int = 0):
    if len(set(scenarios)) < 2:
        raise ValueError("the scenario tagger needs training sentences from at least two scenarios")
    return build_tagger(C, seed).fit(texts, scenarios)


def tag(model, texts: list[str]) -> tuple[list[str], list[float]]:
    """Most probable scenario of each text and its posterior."""
    if not texts:
        return [], []
    proba = model.predict_proba(texts)
    best = proba.argmax(axis=1)
    return [str(model.classes_[i]) for i in best], [round(float(p), 4) for p in proba[np.arange(len(texts)), best]]
