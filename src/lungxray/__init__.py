"""lungxray: chest X-ray classification (covid / normal / pneumonia) with Keras 3.

    from lungxray import Config, load_predictor, train
    result = train("data/", "runs/first", Config(epochs=30))
    predictor = load_predictor(result.run_dir)      # or an export: load_predictor("model.tflite")
    answers = predictor.answer_files(["xray.png"])  # one Answer per film (lungxray.infer.answer)

Names are imported on first use (lazy_loader, as scikit-image does), so that `import lungxray` and
commands that need no model start without loading TensorFlow; `load_predictor` on an export needs
no TensorFlow at all.
"""

import lazy_loader

from lungxray import environment  # noqa: F401  (before anything imports TensorFlow)

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "config": ["Config"],
    "rundir": ["RunDir"],
    "training.recipe": ["train"],
    "infer.answer": ["Answer"],
    "infer.identity": ["ModelIdentity"],
    "infer.predictor": ["Predictor"],
    "infer.loader": ["load_predictor"],
    "infer.keras_predictor": ["KerasPredictor"],
    "infer.lite_predictor": ["LitePredictor"],
})
__all__ = [*__all__, "__version__"]
