"""The web code browser: ``codebook-lens serve CACHE_DIR [--model DIR]`` (see ``server.py``)."""

from .config import AppConfig, AppError
from .server import create_app, serve

__all__ = ["AppConfig", "AppError", "create_app", "serve"]
