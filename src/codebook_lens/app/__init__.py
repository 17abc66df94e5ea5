"""The web code browser: ``codebook-lens serve CACHE_DIR [--model DIR]`` (see ``server.py``)."""

from codebook_lens.app.config import AppConfig, AppError
from codebook_lens.app.server import create_app, serve

__all__ = ["AppConfig", "AppError", "create_app", "serve"]
