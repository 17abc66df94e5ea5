"""The web code browser: ``codebook-lens serve CACHE_DIR [--model DIR]`` (see ``server.py``)."""

from .server import AppConfig, AppError, create_app, serve

__all__ = ["AppConfig", "AppError", "create_app", "serve"]
