"""A local web browser over a code cache (and, optionally, its model): the app and ``serve``.

The app is assembled here from its parts: ``state`` (the cache, model and page data),
``searching`` (searches in worker processes), ``parsing`` (bounded bodies, forms, steering
requests), ``schemas`` (the published types), ``api`` (``/api/...``) and ``pages`` (HTML).
Every number it shows comes from the library (``cache``, ``search``, ``analysis``,
``intervene``).

Safety: the server binds 127.0.0.1 by default and only answers requests addressed to a loopback
name (no DNS rebinding); cross-site POSTs are refused; it reads files only from its cache
(through ``CodeCache``) and its packaged static folder; request bodies are bounded; user
regexes run with the search module's time limit; every input is range-checked against the
published schema; errors are short messages (HTML or JSON), never a stack trace.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from re import Pattern
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from codebook_lens.app import schemas as S
from codebook_lens.app.api import api_router
from codebook_lens.app.config import LOOPBACK_HOSTS, AppConfig, AppError
from codebook_lens.app.pages import HERE, Render, make_templates, page_router
from codebook_lens.app.parsing import BodyLimit, body_limits, head_limit, validation_message
from codebook_lens.app.state import Lens
from codebook_lens.config import __version__

log = logging.getLogger("codebook_lens.app")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"
    ),
}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def allowed_hosts(config: AppConfig) -> set[str] | None:
    """Host names a request may address: loopback names when bound to loopback, else any."""
    return {*LOOPBACK_HOSTS, config.host} if config.loopback else None


def create_app(
    config: AppConfig, *, cache: Any = None, model: Any = None, tokenizer: Any = None
) -> FastAPI:
    """The FastAPI app serving ``config.cache_dir`` (and ``config.model_dir`` if given).

    ``cache``/``model``/``tokenizer`` may be passed already loaded (tests, notebooks). A cache
    that fails its checks, or a model that did not build it, raises before anything is served.
    """
    lens = Lens(config, cache=cache, model=model, tokenizer=tokenizer)
    templates = make_templates()
    models = S.request_models(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        lens.close()

    app = FastAPI(
        title="codebook-lens",
        summary="Browse a code cache: which codes fire on what, and steer with them.",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        debug=False,
        lifespan=lifespan,
    )
    app.state.lens = lens
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    errors = error_pages(app, Render(lens, templates))
    add_guards(app, config, errors)
    routers = [api_router(lens, models), page_router(lens, models, templates)]
    for router in routers:
        app.include_router(router)
    add_error_handlers(app, errors, route_methods(app, routers))
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


ErrorPages = Callable[..., Response]
"""``errors(request, status, message, headers=None)``: the error as the client reads it."""

ERROR_PAGE = {"title": "Error", "active": None, "api_url": None}


def error_pages(app: FastAPI, render: Render) -> ErrorPages:
    """Errors as JSON (``ErrorBody``) under ``/api/``, else as a page with the status."""

    def errors(
        request: Request, status: int, message: str, headers: dict[str, str] | None = None
    ) -> Response:
        headers = {**SECURITY_HEADERS, **(headers or {})}
        reason = _reason(status)
        if request.url.path.startswith("/api/") or request.url.path == "/openapi.json":
            body = {"error": {"status": status, "reason": reason, "message": message}}
            return JSONResponse(body, status_code=status, headers=headers)
        # Pages link static files by route name; a refusal in a middleware comes before the
        # router has put itself in the scope (starlette < 0.40 does not fall back to the app).
        request.scope.setdefault("router", app.router)
        page = {**ERROR_PAGE, "reason": reason, "message": message}
        return render(request, "error.html", None, status=status, headers=headers, **page)

    return errors


def add_guards(app: FastAPI, config: AppConfig, errors: ErrorPages) -> None:
    """Bounded bodies, loopback host names only (no DNS rebinding), no cross-site POSTs, and
    the security headers on every answer."""
    hosts = allowed_hosts(config)

    async def reject(request: Request, status: int, message: str) -> Response:
        return errors(request, status, message)

    app.add_middleware(BodyLimit, limits=body_limits(config), default=64_000, reject=reject)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if hosts is not None and host not in hosts:
            # A page elsewhere that resolves its own name to 127.0.0.1 (DNS rebinding).
            return errors(request, 400, f"host {host!r} is not served here")
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin:
            o = urlsplit(origin)
            if (o.hostname or "").lower() not in (hosts or {host}):
                return errors(request, 403, "cross-site request refused")
        response: Response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response


def route_methods(app: FastAPI, routers: list[APIRouter]) -> list[tuple[Pattern[str], set[str]]]:
    """Each route's path pattern with the methods it serves."""
    routes = [*app.router.routes, *(r for router in routers for r in router.routes)]
    return [(r.path_regex, r.methods or set()) for r in routes if isinstance(r, Route)]


def add_error_handlers(
    app: FastAPI, errors: ErrorPages, methods: list[tuple[Pattern[str], set[str]]]
) -> None:
    """Every error becomes a short message with its status; nothing else reaches the client."""

    def allowed_methods(request: Request) -> str:
        """Every method some route serves at this path (for ``Allow`` on a 405)."""
        path = request.scope["path"]
        return ", ".join(sorted({m for regex, ms in methods if regex.match(path) for m in ms}))

    @app.exception_handler(AppError)
    async def on_app_error(request: Request, exc: AppError) -> Response:
        return errors(request, exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else _reason(exc.status_code)
        headers = dict(exc.headers or {})
        if exc.status_code == 404 and message == "Not Found":
            message = f"no page at {request.url.path}"
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
            message = f"{request.method} is not allowed here; use {headers['Allow']}"
        return errors(request, exc.status_code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        status, message = validation_message(exc)
        return errors(request, status, message)

    @app.exception_handler(ValueError)
    async def on_value_error(request: Request, exc: ValueError) -> Response:
        return errors(request, 400, str(exc))

    @app.exception_handler(FileNotFoundError)
    async def on_missing(request: Request, exc: FileNotFoundError) -> Response:
        return errors(request, 404, str(exc))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("error serving %s", request.url.path, exc_info=exc)
        return errors(request, 500, "internal error; the server log has the details")


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """``/openapi.json``: built once from the routes."""
    if app.openapi_schema is None:
        app.openapi_schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description="The JSON API (`/api/...`) and the HTML pages of `codebook-lens "
            "serve`. Loopback only: requests must address 127.0.0.1, localhost or ::1.",
            routes=app.routes,
            tags=[
                {"name": "api", "description": "JSON: every page's data."},
                {"name": "pages", "description": "HTML pages (errors are pages too)."},
            ],
        )
    return app.openapi_schema


def serve(config: AppConfig, *, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (blocking).

    The search workers start (and warm the cache) and the overview is computed before the port
    opens, so the first requests are as fast as the rest.
    """
    app = create_app(config)
    lens: Lens = app.state.lens

    def warm() -> None:  # draw the health plots before the first visitor asks for them
        try:
            lens.plot("summary")
        except Exception as e:  # the overview page will show the error itself
            log.warning("could not draw the health plots: %s", e)

    try:
        lens.searches.start()
        lens.overview()  # computed once, before the first visitor (it is memoised)
        threading.Thread(target=warm, daemon=True).start()
        if allowed_hosts(config) is None:
            log.warning("serving on %s: the app is reachable from the network", config.host)
        if config.port:  # with port 0 uvicorn reports the port it picked
            print(
                f"codebook-lens: serving {config.cache_dir} on http://{config.host}:{config.port}/"
                f" ({config.workers} search worker(s))"
            )
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            server_header=False,
            # The steering page is a GET form: its query can be far longer than h11's default.
            h11_max_incomplete_event_size=head_limit(S.request_models(config).steer_form),
        )
    finally:
        lens.close()
