"""Temperature scaling (Guo et al., 2017): one number, fitted on validation data, that softens or
sharpens the model's probabilities without changing which class wins."""

from __future__ import annotations

import numpy as np


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): the same as dividing the logits by T."""
    if temperature == 1.0:
        return probabilities
    # NaN rows (unreadable images) stay NaN.
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(probabilities.dtype)


def fit_temperature(probabilities: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising the negative log-likelihood of `y_true`."""
    from scipy.optimize import minimize_scalar  # fitting is training's; applying needs NumPy alone (lite install)

    def nll(log_t: float) -> float:
        scaled = apply_temperature(probabilities.astype(np.float64), float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(scaled[np.arange(len(y_true)), y_true], 1e-12, 1.0))))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))
