"""Evaluation of a model on labelled data (`evaluation.evaluate`): metrics with intervals
(`metrics`), plots, the evaluation's HTML report (`evaluation_report`), metrics.json's schema
(`schema`), paired comparison of runs (`compare`) and the nuisance probe (`probe`)."""
