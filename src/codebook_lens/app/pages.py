"""The HTML pages: each renders the same data its ``/api/...`` twin returns.

Pages: ``/`` overview, ``/search``, ``/code/{codebook}/{code}``, ``/text`` (documents, one
document, pasted text), ``/steer``, ``/plots/{name}.png`` and ``/docs`` (the API reference,
drawn from ``/openapi.json``). Errors are pages too (``error.html``), with the status.
"""

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from codebook_lens.app import schemas as S
from codebook_lens.app.api import search_filters, text_per_page
from codebook_lens.app.config import AppError
from codebook_lens.app.links import code_url, with_query
from codebook_lens.app.parsing import read_form, steering_from_form
from codebook_lens.app.state import Lens

HERE = Path(__file__).resolve().parent
HTML = {"text/html": {"schema": {"type": "string"}}}


def page_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a page's errors: HTML pages with the status's meaning."""
    return {
        s: {"description": S.ERROR_STATUSES[s], "content": HTML}
        for s in sorted({400, 500, *statuses})
    }


def _quoted(text: str) -> str:
    """A token shown with its spaces visible: JSON-quoted, non-ASCII kept (escaped later)."""
    return json.dumps(text, ensure_ascii=False)


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["code_url"] = code_url
    templates.env.filters["quoted"] = _quoted
    templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False)
    return templates


class Render:
    """Renders a page template with the data of its ``/api/...`` twin (linked as ``api_url``)."""

    def __init__(self, lens: Lens, templates: Jinja2Templates) -> None:
        self.lens = lens
        self.templates = templates

    def __call__(
        self,
        request: Request,
        name: str,
        data: Any,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> Response:
        path = request.url.path
        api = "/api" + path.rstrip("/") if path != "/" else "/api/overview"
        if request.url.query:
            api += "?" + request.url.query
        context = {"d": data, "lens": self.lens, "api_url": api, "config": self.lens.config}
        context.update(status=status, **extra)
        return self.templates.TemplateResponse(
            request, name, context, status_code=status, headers=headers
        )


def page_router(lens: Lens, models: S.RequestModels, templates: Jinja2Templates) -> APIRouter:
    """The HTML pages over ``lens``."""
    router = APIRouter(tags=["pages"], default_response_class=HTMLResponse)
    render = Render(lens, templates)
    add_overview_pages(router, lens, render)
    add_search_pages(router, lens, render)
    add_text_pages(router, lens, render, models.text_form)
    add_steer_page(router, lens, render, models.steer_form)
    add_docs_page(router, render)
    return router


def add_overview_pages(router: APIRouter, lens: Lens, render: Render) -> None:
    """``/`` (model, cache and codebook health) and its plots."""

    @router.get("/", responses=page_errors())
    def overview_page(request: Request) -> Response:
        """Model, cache and codebook health, with usage plots."""
        data = lens.overview()
        return render(request, "overview.html", data, active="overview", title="Overview")

    @router.get(
        "/plots/{name}.png",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}, **page_errors(404, 422)},
    )
    def plot(name: Annotated[str, PathParam(max_length=300)]) -> Response:
        """A codebook's usage histogram (or ``summary``) as PNG."""
        return FileResponse(lens.plot(name), media_type="image/png")


def add_search_pages(router: APIRouter, lens: Lens, render: Render) -> None:
    """``/search`` (the form and ranked codes) and ``/code/...`` (one code's profile)."""
    config = lens.config
    Filters = Annotated[dict[str, Any], Depends(search_filters(config, per_page=10))]

    @router.get("/search", responses=page_errors(404, 422))
    async def search_page(
        request: Request,
        *,
        q: Annotated[str, Query(max_length=config.max_query_chars)] = "",
        f: Filters,
    ) -> Response:
        """The search form; with a query, codes ranked for it (the page of ``/api/search``)."""
        p = {"q": q, **f}
        data = await lens.searches.search(p) if q.strip() else None
        here = str(request.url.path) + "?" + request.url.query
        page_no = p["page"]
        return render(
            request,
            "search.html",
            data or {},
            form=p,
            has_result=data is not None,
            codebooks=lens.codebooks,
            labels=lens.labels(),
            active="search",
            title="Search" if not q else f"Search {q!r}",
            prev_url=with_query(here, page=page_no - 1) if page_no > 1 else None,
            next_url=with_query(here, page=page_no + 1) if data and data["has_next"] else None,
        )

    @router.get("/code/{codebook}/{code}", responses=page_errors(404, 422))
    def code_page(
        request: Request,
        codebook: Annotated[str, PathParam(max_length=300)],
        code: Annotated[int, PathParam(ge=0, le=1 << 40)],
        head: Annotated[int | None, Query(ge=0, le=1 << 20)] = None,
        contexts: Annotated[int, Query(ge=1, le=config.max_page_size)] = 20,
        window: Annotated[int, Query(ge=0, le=400)] = 60,
    ) -> Response:
        """A code's profile (the page of ``/api/code/...``)."""
        data = lens.code(codebook, code, head, n_contexts=contexts, window=window)
        can_more = contexts < config.max_page_size and len(data["contexts"]) == contexts
        title = data["ref"]["label"]
        return render(request, "code.html", data, active="search", title=title, can_more=can_more)


def add_text_pages(router: APIRouter, lens: Lens, render: Render, TextForm: type[Any]) -> None:
    """``/text``: the document list, one document's tokens, or pasted text."""
    config = lens.config

    @router.get("/text", responses=page_errors(404, 422))
    def text_page(
        request: Request,
        doc: Annotated[int | None, Query(ge=0, le=1 << 40)] = None,
        codebook: Annotated[str, Query(max_length=300)] = "",
        label: Annotated[str, Query(max_length=300)] = "",
        page_no: Annotated[int | None, Query(alias="page", ge=1, le=1_000_000)] = None,
        per_page: Annotated[int, text_per_page(lens)] = 500,
        pos: Annotated[int | None, Query(ge=0, le=1 << 40)] = None,
    ) -> Response:
        """The document list, or one document's tokens with their codes."""
        common: dict[str, Any] = {"active": "text", "codebooks": lens.codebooks}
        if doc is None:
            docs = lens.docs_page(label or None, page_no or 1, config.page_size)
            return render(request, "text.html", docs, mode="list", title="Text", **common)
        data = lens.text_doc(doc, codebook or lens.codebooks[0], page_no, per_page, pos)
        title = f"Document {data['id']}"
        return render(request, "text.html", data, mode="doc", title=title, **common)

    form_body = {"application/x-www-form-urlencoded": {"schema": TextForm.model_json_schema()}}

    @router.post(
        "/text",
        responses=page_errors(403, 404, 409, 413, 422),
        openapi_extra={"requestBody": {"required": True, "content": form_body}},
    )
    async def text_paste_page(request: Request) -> Response:
        """Pasted text through the model (the text page's form; needs the model)."""
        form = read_form(await request.body(), TextForm)
        codebook = form.codebook or lens.codebooks[0]
        data = await run_in_threadpool(lens.text_paste, form.text, codebook)
        return render(
            request,
            "text.html",
            data,
            mode="pasted",
            active="text",
            title="Pasted text",
            codebooks=lens.codebooks,
            pasted=form.text,
        )


def add_steer_page(router: APIRouter, lens: Lens, render: Render, SteerForm: type[Any]) -> None:
    """``/steer``: the steering form and its samples."""

    @router.get("/steer", responses=page_errors(409, 422))
    def steer_page(request: Request, form: Annotated[SteerForm, Query()]) -> Response:  # type: ignore[valid-type]
        """The steering form; with a prompt, unsteered and steered samples side by side.

        Errors in the request show above the form (which keeps its input), with the status."""
        data, error, status = None, None, 200
        if form.prompt.strip():  # type: ignore[attr-defined]
            try:
                lens.needs_model("steering")
                data = lens.steer(steering_from_form(form))
            except (ValueError, AppError) as e:
                error = e.message if isinstance(e, AppError) else str(e)
                status = e.status if isinstance(e, AppError) else 400
        return render(
            request,
            "steer.html",
            data or {},
            status=status,
            form=form.model_dump(),  # type: ignore[attr-defined]
            result=data,
            error=error,
            codebooks=lens.cache.codebooks,
            active="steer",
            title="Steer",
            can_steer=lens.can_steer,
            api_url=None,
        )


def add_docs_page(router: APIRouter, render: Render) -> None:
    """``/docs``: the API reference, drawn from ``/openapi.json``."""

    @router.get("/docs", include_in_schema=False)
    def api_docs_page(request: Request) -> Response:
        """The API reference: every operation of ``/openapi.json`` with its inputs and answers."""
        spec = request.app.openapi()
        return render(
            request,
            "api_docs.html",
            spec,
            ops=operations(spec),
            active="docs",
            title="API",
            api_url="/openapi.json",
        )


def operations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The operations of an OpenAPI document, flattened for the reference page."""
    out = []
    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {})
            out.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "description": op.get("description", ""),
                    "tag": (op.get("tags") or [""])[0],
                    "parameters": op.get("parameters", []),
                    "body": {ct: c.get("schema", {}) for ct, c in body.items()},
                    "responses": op.get("responses", {}),
                    "anchor": f"{method}-{path}".replace("/", "_").strip("_"),
                }
            )
    return out
