"""The web code browser: ``codebook-lens serve CACHE_DIR [--model DIR]`` (see ``server.py``).

``AppConfig`` and ``AppError`` load without the web stack; ``create_app`` and ``serve`` import
FastAPI and uvicorn (the ``app`` extra) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from codebook_lens.app.config import AppConfig, AppError

if TYPE_CHECKING:
    from codebook_lens.app.server import create_app, serve

__all__ = ["AppConfig", "AppError", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name not in ("create_app", "serve"):
        raise AttributeError(f"module 'codebook_lens.app' has no attribute {name!r}")
    value = getattr(importlib.import_module("codebook_lens.app.server"), name)
    globals()[name] = value
    return value
