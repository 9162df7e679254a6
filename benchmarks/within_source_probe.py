"""How much of covid-vs-pneumonia do the frozen features hold, without the hospital to lean on?

    python benchmarks/within_source_probe.py --data ../shared/cxr/manifest.csv --weights W

5-fold cross-validated logistic regression (the OOD gate's log-scaled features, standardised) on
covid against pneumonia films, within one source (ieee8023: both classes, adults, one collection)
and across all adult films of all sources (where the source gives the answer away).
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lungxray.data.records import load_dataset
from lungxray.model.features import FeatureExtractor
from lungxray.model.network import build_backbone

SELECTIONS = {
    "ieee8023 only": lambda r: r.extra["source"] == "ieee8023_covid-chestxray",
    "adults, all sources": lambda r: r.extra["age_group"] == "adult",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", default="imagenet")
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    print("| pooling | films | covid | pneumonia | cross-validated AUROC |\n|---|---|---|---|---|")
    for pooling in ("max", "avg"):
        extractor = FeatureExtractor(build_backbone(args.weights, 224, pooling), 224)
        for name, selected in SELECTIONS.items():
            records = [r for r in dataset.records if r.label in ("covid", "pneumonia") and selected(r)]
            features = extractor.extract([r.path for r in records], desc=name).vectors["orig"]
            y = np.array([r.label == "pneumonia" for r in records])
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            scores = cross_val_predict(probe, np.log1p(np.maximum(features, -0.5)), y, method="predict_proba",
                                       cv=StratifiedKFold(5, shuffle=True, random_state=0))[:, 1]
            print(f"| {pooling} | {name} | {(~y).sum()} | {y.sum()} | {roc_auc_score(y, scores):.3f} |", flush=True)


if __name__ == "__main__":
    main()
