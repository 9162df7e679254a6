"""`lungxray serve`: a REST API and a one-page web app around a trained model (`app`), run by
uvicorn (`server`, `workers`), with keys, rate limits, metrics and the audit log around it
(`operations`, `guards`, `keys`, `metrics`) and its contract (`schema`)."""

from lungxray.serve.app import create_app
from lungxray.serve.server import serve

__all__ = ["create_app", "serve"]
