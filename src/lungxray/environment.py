"""What must hold before TensorFlow is first imported, set once when `lungxray` is imported:
TensorFlow's C++ start-up chatter (CPU features, oneDNN notices) off unless the user asked for it."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
