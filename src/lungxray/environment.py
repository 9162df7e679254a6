"""The process environment. What must hold before TensorFlow is first imported, set once when
`lungxray` is imported: TensorFlow's C++ start-up chatter (CPU features, oneDNN notices) off unless
the user asked for it. And `variables_set`, for what a process started inside a block inherits."""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def variables_set(variables: dict[str, str]):
    """`variables` set in this process's environment while the block runs, then as they were."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
