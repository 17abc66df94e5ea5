"""The JSON API: ``/api/...``, one operation per page, typed by ``schemas``.

Every operation declares its answer model and each error status it can return (all with the
``ErrorBody`` JSON), so ``/openapi.json`` is the exact contract; ``tests/test_app_schema.py``
fuzzes the app against it.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path as PathParam, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from codebook_lens.app import schemas as S
from codebook_lens.app.config import AppConfig
from codebook_lens.app.parsing import steering_from_body
from codebook_lens.app.state import MAX_CODE_REFS, Lens


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for JSON errors: each status with ``ErrorBody`` and its meaning.

    400 (a host name not served here) and 500 are possible on every operation.
    """
    return {
        s: {"model": S.ErrorBody, "description": S.ERROR_STATUSES[s]}
        for s in sorted({400, 500, *statuses})
    }


def search_query(config: AppConfig) -> Any:
    """The search's ``q`` parameter: a non-blank regex, token or topic."""
    return Query(
        min_length=1,
        max_length=config.max_query_chars,
        pattern=S.NonBlank,
        description="A regex (Python `regex` syntax; a token is on the pattern if its "
        "characters overlap a match), a token string, or a document label (topic).",
    )


def search_filters(config: AppConfig, *, per_page: int) -> Any:
    """The search's other query parameters (filters and paging), shared with the search page;
    ``per_page`` is the default page size."""
    default_per_page = per_page

    def filters(
        kind: Annotated[S.SearchKind, Query()] = "regex",
        codebook: Annotated[
            str, Query(max_length=300, description="One codebook, or '' for every codebook.")
        ] = "",
        sort: Annotated[S.SortKey, Query()] = "f1",
        min_count: Annotated[int, Query(ge=0, le=1 << 40)] = 1,
        min_precision: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
        min_recall: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
        page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
        per_page: Annotated[int, Query(ge=1, le=config.max_page_size)] = default_per_page,
    ) -> dict[str, Any]:
        return {
            "kind": kind,
            "codebook": codebook,
            "sort": sort,
            "min_count": min_count,
            "min_precision": min_precision,
            "min_recall": min_recall,
            "page": page,
            "per_page": per_page,
        }

    return filters


def text_per_page(lens: Lens) -> Any:
    """The ``per_page`` parameter of a document's tokens, with the page budget it must fit."""
    fit = max(1, MAX_CODE_REFS // lens.codes_per_token(None))
    return Query(
        ge=1,
        le=5000,
        description=f"Tokens per page. A page lists at most {MAX_CODE_REFS} (token, code) "
        f"pairs: with every codebook at most {fit} tokens fit, with one codebook more; a page "
        "over the budget is refused with 400.",
    )


def api_router(lens: Lens, models: S.RequestModels) -> APIRouter:
    """The ``/api`` operations over ``lens``."""
    config = lens.config
    router = APIRouter(prefix="/api", tags=["api"])
    Q = Annotated[str, search_query(config)]
    Filters = Annotated[dict[str, Any], Depends(search_filters(config, per_page=config.page_size))]
    PerPage = Annotated[int, Query(ge=1, le=config.max_page_size)]
    Page = Annotated[int, Query(ge=1, le=1_000_000)]
    Name = Annotated[str, Query(max_length=300)]
    SteerBody = models.steer
    TextBody = models.text

    @router.get("/overview", response_model=S.Overview, responses=errors())
    async def overview() -> dict[str, Any]:
        """The cache, the model and every codebook's health (usage, dead codes, entropy)."""
        return lens.overview()

    @router.get("/search", response_model=S.SearchResponse, responses=errors(404, 422))
    async def search(q: Q, f: Filters) -> Response:
        """Codes ranked by precision, recall or F1 against a regex, token or topic.

        One ranked list per codebook; ``page`` pages through every list at once. 404: the
        codebook or topic is not in the cache; 400: the regex does not compile or times out.
        """
        # The worker's JSON goes out as it is (it was built from the same fields).
        body = await lens.searches.search_json({"q": q, **f})
        return Response(body, media_type="application/json")

    @router.get(
        "/code/{codebook}/{code}", response_model=S.CodeProfileOut, responses=errors(404, 422)
    )
    def code(
        codebook: Annotated[str, PathParam(max_length=300)],
        code: Annotated[int, PathParam(ge=0, le=1 << 40)],
        head: Annotated[int | None, Query(ge=0, le=1 << 20)] = None,
        contexts: Annotated[int, Query(ge=1, le=config.max_page_size)] = 20,
        window: Annotated[int, Query(ge=0, le=400)] = 60,
    ) -> dict[str, Any]:
        """A code's profile: contexts, tokens and labels it fires on, similar codes, and (with
        the model) the tokens it promotes. Per-head codebooks need ``head``."""
        return lens.code(codebook, code, head, n_contexts=contexts, window=window)

    @router.get("/docs", response_model=S.DocList, responses=errors(404, 422))
    def docs(
        label: Name = "", page: Page = 1, per_page: PerPage = config.page_size
    ) -> dict[str, Any]:
        """The cached documents (optionally those with one label), a page at a time."""
        return lens.docs_page(label or None, page, per_page)

    @router.get("/text", response_model=S.CachedText, responses=errors(404, 422))
    def text(
        doc: Annotated[int, Query(ge=0, le=1 << 40)],
        codebook: Annotated[str, Query(max_length=300, description="'' or 'all': every one")] = "",
        page: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
        per_page: Annotated[int, text_per_page(lens)] = 500,
        pos: Annotated[int | None, Query(ge=0, le=1 << 40)] = None,
    ) -> dict[str, Any]:
        """Every token of a cached document (a page of it) with its codes; ``pos`` opens the
        page holding that token and marks it."""
        return lens.text_doc(doc, codebook or None, page, per_page, pos)

    @router.post("/text", response_model=S.PastedText, responses=errors(403, 404, 409, 413, 422))
    async def text_paste(body: TextBody) -> dict[str, Any]:  # type: ignore[valid-type]
        """Pasted text through the model: every token with its codes (needs the model)."""
        return await run_in_threadpool(lens.text_paste, body.text, body.codebook)  # type: ignore[attr-defined]

    @router.post("/steer", response_model=S.SteerResponse, responses=errors(403, 409, 413, 422))
    async def steer(body: SteerBody) -> dict[str, Any]:  # type: ignore[valid-type]
        """Unsteered and steered samples side by side (same prompt, same seeds).

        400: the intervention does not fit the model (unknown codebook, code or head, a
        position past the sequence, a spec that does not parse), or the prompt plus
        ``max_new_tokens`` is longer than the model's context."""
        lens.needs_model("steering")
        return await run_in_threadpool(lens.steer, steering_from_body(body))

    return router
