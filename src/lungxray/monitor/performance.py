"""How well the model does in a window of records: estimated without labels from its calibrated
probabilities (confidence-based performance estimation, as NannyML's CBPE), and, where
radiologists' reads are given, realised, with 95% Wilson intervals.

Without labels: the estimated accuracy is the mean of the top probability (what a calibrated model
expects to get right); class c's sensitivity, the probability mass of c on films whose top class is c
over all the mass of c. This holds while the calibration does: under a change of prevalence or of
the films themselves (a concept shift) the estimate drifts from the truth, which is why drift is
scored beside it (docs/monitoring.md says how far it went wrong in the simulations).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from lungxray.monitor.records import probabilities


def wilson(successes: int, trials: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """The Wilson score interval of a proportion."""
    if trials == 0:
        return None, None
    z = stats.norm.ppf(0.5 + level / 2)
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return round(float(centre - half), 4), round(float(centre + half), 4)


def window_summary(records: list[dict], classes: list[str]) -> dict:
    """What the window's records say of themselves: counts, rates, the estimate without labels."""
    p = probabilities(records, classes)
    analysed = p[~np.isnan(p).any(axis=1)]
    flags = [r["ood"] for r in records if r.get("ood") is not None]
    sizes = [r["set_size"] for r in records if r.get("set_size") is not None]
    summary = {"n": len(records), "analysed": len(analysed),
               "start": records[0].get("time"), "end": records[-1].get("time"),
               "withheld_rate": round(float(np.mean([r.get("decision") == "withheld" for r in records])), 4),
               "not_analysed_rate": round(1 - len(analysed) / len(records), 4),
               "ood_rate": round(float(np.mean(flags)), 4) if flags else None,
               "ood_flagged": int(sum(flags)), "ood_judged": len(flags),
               "mean_set_size": round(float(np.mean(sizes)), 4) if sizes else None}
    summary["estimated"] = estimate(analysed, classes) if len(analysed) else None
    return summary


def estimate(p: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class sensitivity and prevalence expected from calibrated probabilities `p`."""
    top = p.argmax(axis=1)
    mass = p.sum(axis=0)
    return {"accuracy": round(float(p.max(axis=1).mean()), 4),
            "sensitivity": {c: round(float(p[top == i, i].sum() / mass[i]), 4) if mass[i] > 0 else None
                            for i, c in enumerate(classes)},
            "prevalence": {c: round(float(p[:, i].mean()), 4) for i, c in enumerate(classes)}}


def realised(records: list[dict], classes: list[str], labels: dict[str, str]) -> dict | None:
    """The window's metrics on the films the reads cover (by image hash or hashed SOP Instance UID),
    the top class against the read, with the label-free estimate on the same films and its error."""
    p = probabilities(records, classes)
    read = [(row, labels.get(r.get("sha256") or "") or labels.get(r.get("sop_instance_uid") or ""))
            for row, r in enumerate(records)]
    pairs = [(row, label) for row, label in read if label in classes and not np.isnan(p[row]).any()]
    if not pairs:
        return None
    rows, truth = [row for row, _ in pairs], np.array([classes.index(label) for _, label in pairs])
    predicted = p[rows].argmax(axis=1)
    right = int((predicted == truth).sum())
    expected = estimate(p[rows], classes)
    sensitivity = {c: {"value": round(float(np.mean(predicted[truth == i] == i)), 4) if (truth == i).any() else None,
                       "ci95": wilson(int(((predicted == i) & (truth == i)).sum()), int((truth == i).sum()))}
                   for i, c in enumerate(classes)}
    accuracy = right / len(rows)
    return {"n": len(rows), "accuracy": round(accuracy, 4), "accuracy_ci95": wilson(right, len(rows)),
            "sensitivity": sensitivity, "estimated_accuracy": expected["accuracy"],
            "estimate_error": round(expected["accuracy"] - accuracy, 4)}
