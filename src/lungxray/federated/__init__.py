"""Federated training on Flower: the recipe's head learnt from sites that keep their films
(docs/federated.md). `simulate` runs every site on this machine; `apps` holds the Flower apps."""

from lungxray.federated.simulation import simulate

__all__ = ["simulate"]
