"""The model's parts, shared by training and inference: the network (`network`: backbone and head,
built and loaded), the backbone's runtimes and feature cache (`runtimes`, `features`), the
out-of-distribution gate (`ood`), temperature scaling (`calibration`), conformal sets
(`conformal`) and the lung-field crop (`lungs`). It imports `data` and the foundations only."""
