"""What a centralised run fits after training, fitted by the server from what the sites sent
(`site.py`), without a film or a feature vector leaving a site:

- the temperature: the candidate whose summed negative log-likelihood over all sites is lowest;
- the conformal sets: each site's scores per class, added up as histograms; the calibration scores
  are the bins' upper edges, so that every p-value is at least what the exact scores give (sets
  never smaller, coverage never below its target) and differs by at most a bin (1e-4);
- the out-of-distribution gate: the mean and Ledoit-Wolf shrunk covariance of the log-scaled
  training features, from the sites' sums (the same estimate scikit-learn's `LedoitWolf` makes of
  the pooled rows, to float rounding); the threshold, the 99th percentile of the validation scores,
  read off the sites' summed histograms (at most one bin, 0.07%, above the pooled percentile).
"""

from __future__ import annotations

import numpy as np

from lungxray.federated.site import CONFORMAL_EDGES, GATE_EDGES, TEMPERATURES
from lungxray.model.conformal import ConformalSets
from lungxray.model.ood import VALIDATION_QUANTILE, OutOfDistribution


def temperature_from_nll(summed_nll: np.ndarray) -> float:
    """The candidate temperature with the lowest negative log-likelihood summed over the sites."""
    return float(TEMPERATURES[int(np.argmin(summed_nll))])


def conformal_from_histograms(counts: np.ndarray, classes: list[str]) -> ConformalSets:
    """Class-conditional conformal sets from the summed (classes, bins) histograms of scores."""
    upper = CONFORMAL_EDGES[1:]
    return ConformalSets(list(classes), {c: np.round(np.repeat(upper, counts[i]), 7) for i, c in enumerate(classes)})


def gate_from_moments(count: int, mean: np.ndarray, scatter: np.ndarray, fourth: float) -> OutOfDistribution:
    """The gate's mean and precision from the pooled count, mean, scatter matrix about the mean and
    sum of ||x - mean||^4; its threshold is set later (`quantile_from_histogram`).

    Ledoit-Wolf's shrinkage as scikit-learn computes it (`sklearn.covariance.ledoit_wolf_shrinkage`):
    with S the empirical covariance and mu = trace(S) / p,
        beta  = (sum_k ||x_k||^4 / n - sum(S^2)) / (p n),   delta = (sum(S^2) - 2 mu trace(S) + p mu^2) / p,
    shrinkage = min(beta, delta) / delta, covariance = (1 - shrinkage) S + shrinkage mu I."""
    from scipy import linalg

    features = len(mean)
    empirical = scatter / count
    trace = float(np.trace(empirical))
    mu = trace / features
    squares = float(np.sum(empirical ** 2))
    beta = (fourth / count - squares) / (features * count)
    delta = (squares - 2.0 * mu * trace + features * mu ** 2) / features
    shrinkage = 0.0 if beta == 0 else min(beta, delta) / delta
    covariance = (1.0 - shrinkage) * empirical
    covariance.flat[:: features + 1] += shrinkage * mu
    return OutOfDistribution(mean, linalg.pinvh(covariance, check_finite=False), np.inf)


def quantile_from_histogram(counts: np.ndarray, edges: np.ndarray = GATE_EDGES,
                            quantile: float = VALIDATION_QUANTILE) -> float:
    """The upper edge of the bin holding the `quantile` of the values counted."""
    cumulative = np.cumsum(counts)
    if cumulative[-1] == 0:
        raise ValueError("no values were counted")
    return float(edges[1:][np.searchsorted(cumulative, quantile * cumulative[-1], side="left")])
