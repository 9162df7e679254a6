"""lungxray: chest X-ray classification (covid / normal / pneumonia) with Keras 3.

    from lungxray import Config, train, Predictor
    result = train("data/", "runs/first", Config(epochs=30))
    predictor = Predictor.load(result.run_dir)
    predictions = predictor.predict_files(["xray.png"])  # .probabilities, .errors
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

from lungxray.config import Config  # noqa: E402
from lungxray.predict import Predictor  # noqa: E402
from lungxray.train import train  # noqa: E402

__all__ = ["Config", "Predictor", "train", "__version__"]
