"""Serving over HTTP: the Open Inference Protocol (KServe v2) as an ASGI app, with Prometheus
metrics (`pip install aioti[serve]`). `aioti serve MODEL.pt2` runs it with uvicorn."""

from .app import ModelRepository, app

__all__ = ["ModelRepository", "app"]
