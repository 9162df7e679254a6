"""Federated training on Flower: the recipe's head learnt from sites that keep their films
(docs/federated.md). `simulate` runs every site on this machine; `apps` holds the Flower apps.

`simulate` is imported on first use (lazy_loader), so that a site's ClientApp, which imports
`lungxray.federated.apps`, loads TensorFlow only when it trains."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={"simulation": ["simulate"]})
