"""Training: the recipe end to end (`recipe.train`), its engines (Keras, cached features, cached
block inputs: `engines`), tf.distribute strategies (`distribute`) and the run's own summary
(`run_report`, report.md). It may import everything below it: data, model, infer, evaluate."""
