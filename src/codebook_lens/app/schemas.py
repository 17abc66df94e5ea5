"""The JSON API's published types: what each ``/api/...`` operation takes and returns.

These pydantic models are the OpenAPI schema (``/openapi.json``): FastAPI validates requests
against them (a request that does not fit is a 422) and filters every answer through them.
Request models depend on the server's limits (``AppConfig``), so ``request_models(config)``
builds them for one server; answers have fixed shapes. An answer that carries a library result
extends the result's dataclass (a pydantic dataclass over it), so each result is declared once.
"""

import dataclasses
from dataclasses import KW_ONLY, dataclass
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from codebook_lens.app.config import AppConfig
from codebook_lens.codes.analysis import CodebookHealth
from codebook_lens.codes.direct_effect import PromotedToken
from codebook_lens.codes.search import (
    ActivationStats,
    CodeMatch,
    CodeProfile,
    Context,
    LabelCount,
    SortKey,
    TokenCount,
)
from codebook_lens.flags import field_docs


def _inherited_docs(schema: dict[str, Any], cls: type) -> None:
    """Describe the fields an answer inherits from a library dataclass by their docstrings
    there (pydantic reads only the docstrings of a class's own fields)."""
    props = schema.get("properties", {})
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            for name, doc in field_docs(base).items():
                if name in props:
                    props[name].setdefault("description", doc)


DOCS = ConfigDict(use_attribute_docstrings=True, json_schema_extra=_inherited_docs)
"""Field docstrings (the class's own and, for dataclasses, inherited ones) become the
schema's descriptions."""


class Doc(BaseModel):
    """A model whose field docstrings become the schema's descriptions."""

    model_config = DOCS


# ------------------------------------------------------------------- errors
ERROR_STATUSES: dict[int, str] = {
    400: "The request has the documented shape but its content is refused: a regex that does "
    "not compile or runs past the time limit, an intervention that does not fit the model, "
    "a body that is not JSON, or a host name that this server does not answer to.",
    403: "A cross-site request (its Origin is another site).",
    404: "No such codebook, code, head, document, position, topic, plot or page.",
    405: "The path exists but not with this method (the `Allow` header lists the methods).",
    409: "The operation needs the model: start the server with `--model DIR`.",
    413: "The request body is larger than this operation accepts.",
    422: "A parameter or body field does not fit the schema (type, range, length, choices).",
    500: "An unexpected error; the server log has the details (never shown to clients).",
}


class ErrorDetail(Doc):
    status: int
    """The HTTP status, repeated."""
    reason: str
    """The status's standard phrase, e.g. 'Not Found'."""
    message: str
    """What was wrong and what is allowed, in one or a few sentences."""


class ErrorBody(Doc):
    """Every error of the JSON API (HTML pages show the same message in a page)."""

    error: ErrorDetail


# ----------------------------------------------------------------- requests
SearchKind = Literal["regex", "token", "topic"]
Action = Literal["force", "ban"]
Slot = Literal["replace-lowest", "append"]
NonBlank = r"\S"
"""Regex a text field must contain somewhere (at least one non-space character)."""


def _whole(value: Any) -> Any:
    """JSON does not tell 1 from 1.0 (JSON Schema counts both as integers): take whole floats
    as integers, and leave everything else to the strict check (no strings, no booleans)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Whole = BeforeValidator(_whole)
"""Metadata for an integer of a JSON body, after its bounds (pydantic drops bounds that come
after a validator from the JSON schema): strict, so ``"3"`` and ``true`` are refused."""


def _unique(codes: int | list[int]) -> int | list[int]:
    if isinstance(codes, list) and len(set(codes)) != len(codes):
        raise ValueError("a code id is listed twice")
    return codes


CodeId = Annotated[int, Ge(0), Le(1 << 40), Whole]
Position = Annotated[int, Ge(-(1 << 20)), Le(1 << 20), Whole]
HeadId = Annotated[int, Ge(0), Le(1 << 20), Whole]


class Edit(Doc):
    """One edit of an intervention (``intervene.EditSpec``): force or ban codes somewhere."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    codebook: str = Field(min_length=1, max_length=300)
    """Codebook name, e.g. 'layers.0.attn_heads' or 'layers.1.mlp_out'."""
    codes: Annotated[
        CodeId | Annotated[list[CodeId], Field(min_length=1, max_length=256)],
        AfterValidator(_unique),
        Field(json_schema_extra={"uniqueItems": True}),
    ]
    """A code id or a list of distinct code ids (each below the codebook's size)."""
    positions: (
        Annotated[str, Field(min_length=1, max_length=100)]
        | Position
        | Annotated[list[Position], Field(min_length=1)]
    ) = "all"
    """'all', 'prompt', 'generated', an index, a list of indices, or a slice like '3:10'."""
    action: Action = "force"
    slot: Slot = "replace-lowest"
    """For 'force': overwrite the lowest-ranked chosen codes, or 'append' them."""
    scale: float = Field(1.0, ge=-100.0, le=100.0, allow_inf_nan=False)
    """For 'force': weight multiplying the forced code vectors (an SAE latent: the multiple
    of its largest activation in the cache it is added at, unless value is given)."""
    head: HeadId | None = None
    """For per-head codebooks: the head to edit; null edits every head."""
    value: float | None = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False)
    """For 'force' on an SAE latent: the activation to add it at; null: scale x its largest
    activation in the cache."""


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one server (their limits come from its ``AppConfig``)."""

    steer: type[BaseModel]
    text: type[BaseModel]
    text_form: type[BaseModel]
    steer_form: type[BaseModel]


EmptyField = Literal[""]
"""An HTML form's empty input (the field keeps its default)."""


def request_models(config: AppConfig) -> RequestModels:
    """Request models with ``config``'s limits (so the published schema states them)."""
    prompt_chars, text_chars = config.max_prompt_chars, config.max_text_chars
    samples, new_tokens = config.max_samples, config.max_new_tokens

    class SteerRequest(Doc):
        """A prompt and an intervention: unsteered and steered samples side by side."""

        model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

        prompt: str = Field(min_length=1, max_length=prompt_chars, pattern=NonBlank)
        """Text to continue."""
        edits: list[Edit] = Field(default_factory=list, max_length=64)
        """The intervention; empty = unsteered samples only."""
        spec: str | None = Field(None, max_length=20_000)
        """An intervention spec as YAML or JSON text; replaces ``edits`` when given (text that
        is not a spec is refused with 400)."""
        num_samples: Annotated[int, Ge(1), Le(samples), Whole] = 3
        max_new_tokens: Annotated[int, Ge(1), Le(new_tokens), Whole] = 40
        temperature: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
        """0 = greedy."""
        top_k: Annotated[int, Ge(1), Le(1 << 20), Whole] | None = None
        top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
        seed: Annotated[int, Ge(0), Le(2**31 - 1), Whole] = 0
        """Seed of the sampling (the same draws on both sides)."""

    class TextRequest(Doc):
        """Text to run through the model; every token comes back with its codes."""

        model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

        text: str = Field(min_length=1, max_length=text_chars, pattern=NonBlank)
        codebook: str | None = Field(None, max_length=300)
        """One codebook's codes, or every codebook's (null, '' or 'all')."""

    class TextForm(Doc):
        """The text page's form (``application/x-www-form-urlencoded``)."""

        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        text: str = Field(min_length=1, max_length=text_chars, pattern=NonBlank)
        codebook: str = Field("", max_length=300)

    def num(kind: type, **limits: Any) -> Any:
        return Annotated[kind, Field(**limits)] | EmptyField

    class SteerForm(Doc):
        """The steering page's form (query fields; an empty field keeps its default)."""

        prompt: str = Field("", max_length=prompt_chars)
        codebook: str = Field("", max_length=300)
        head: num(int, ge=0, le=1 << 20) = ""  # type: ignore[valid-type]
        codes: str = Field("", max_length=2000, pattern=r"^[\d\s,]*$")
        """Code ids separated by commas or spaces, e.g. '12, 40'."""
        positions: str = Field("", max_length=100)
        action: Action | EmptyField = ""
        slot: Slot | EmptyField = ""
        scale: num(float, ge=-100.0, le=100.0, allow_inf_nan=False) = ""  # type: ignore[valid-type]
        value: num(float, ge=-1e6, le=1e6, allow_inf_nan=False) = ""  # type: ignore[valid-type]
        """For 'force' on an SAE latent: the activation to add it at (default: scale x its
        largest activation in the cache)."""
        spec: str = Field("", max_length=20_000)
        """A full intervention spec (YAML or JSON); replaces the single-edit fields."""
        num_samples: num(int, ge=1, le=samples) = ""  # type: ignore[valid-type]
        max_new_tokens: num(int, ge=1, le=new_tokens) = ""  # type: ignore[valid-type]
        temperature: num(float, ge=0.0, le=10.0, allow_inf_nan=False) = ""  # type: ignore[valid-type]
        top_k: num(int, ge=1, le=1 << 20) = ""  # type: ignore[valid-type]
        top_p: num(float, gt=0.0, le=1.0, allow_inf_nan=False) = ""  # type: ignore[valid-type]
        seed: num(int, ge=0, le=2**31 - 1) = ""  # type: ignore[valid-type]

    return RequestModels(SteerRequest, TextRequest, TextForm, SteerForm)


# ------------------------------------------------------------------ answers
class CodeRef(Doc):
    """A code, with its name and the link to its page."""

    codebook: str
    head: int | None
    """Head of a per-head codebook, else null."""
    code: int
    label: str
    """e.g. 'layers.0.attn_heads h2 #12'."""
    short: str
    url: str


class CacheInfo(Doc):
    name: str
    n_tokens: int
    n_docs: int
    seq_len: int
    tokenizer: str
    created: dict[str, Any]


class ModelInfo(Doc):
    """The model that built the cache (from the manifest) and whether it is loaded."""

    loaded: bool
    base_model: str | None = None
    model_type: str | None = None
    vocab_size: int | None = None
    config_hash: str | None = None
    codebook_hash: str | None = None


@pydantic_dataclass(config=DOCS)
class CodebookOverview(CodebookHealth):
    """``analysis.codebook_health`` of one codebook, plus where it sits."""

    layer: int | None
    dim: int
    grouped: bool
    plot_url: str


class Overview(Doc):
    cache: CacheInfo
    model: ModelInfo
    labels: list[str]
    """Document labels: the topics a search can use."""
    codebooks: list[CodebookOverview]
    summary_plot_url: str
    steer: bool
    """Whether steering and pasted text are available (a model is loaded)."""


class SearchFilters(Doc):
    codebook: str | None
    min_count: int
    min_precision: float
    min_recall: float


@pydantic_dataclass(config=DOCS)
class SearchMatch(CodeMatch):
    """``search.CodeMatch``: one code's agreement with the pattern."""

    label: str
    url: str


class SearchSection(Doc):
    codebook: str
    matches: list[SearchMatch]
    has_next: bool
    more_url: str
    """The search page for this codebook alone."""


class SearchResponse(Doc):
    """Codes ranked by agreement with a pattern, one list per codebook."""

    kind: SearchKind
    query: str
    pattern_tokens: int
    """Tokens the pattern selects."""
    n_tokens: int
    sort_by: SortKey
    filters: SearchFilters
    page: int
    per_page: int
    has_next: bool
    """Whether any codebook has another page."""
    results: list[SearchSection]


@pydantic_dataclass(config=DOCS)
class ContextOut(Context):
    """``search.Context``: a token where the code fires, with text around it."""

    doc_url: str


@pydantic_dataclass(config=DOCS)
class TokenCountOut(TokenCount):
    """``search.TokenCount``."""


@pydantic_dataclass(config=DOCS)
class LabelCountOut(LabelCount):
    """``search.LabelCount``."""


class SimilarCodeOut(CodeRef):
    cosine: float


@pydantic_dataclass(config=DOCS)
class PromotedTokenOut(PromotedToken):
    """``direct_effect.PromotedToken``."""


@pydantic_dataclass(config=DOCS)
class ActivationStatsOut(ActivationStats):
    """``search.ActivationStats``: how strongly an SAE latent fires where it fires."""


@pydantic_dataclass(config=ConfigDict(**DOCS, json_schema_serialization_defaults_required=True))
class CodeProfileOut(CodeProfile):
    """``search.code_profile``: how often a code fires, where, on what, and what it writes."""

    contexts: list[ContextOut]  # type: ignore[assignment]
    tokens: list[TokenCountOut]  # type: ignore[assignment]
    labels: list[LabelCountOut]  # type: ignore[assignment]
    similar: list[SimilarCodeOut]  # type: ignore[assignment]
    promoted: list[PromotedTokenOut] | None = None  # type: ignore[assignment]
    """Tokens the code promotes most (needs the model), else null."""
    activations: ActivationStatsOut | None = None  # type: ignore[assignment]
    """An SAE latent's activations where it fires (mean, max, histogram); null for codes."""
    _: KW_ONLY
    ref: CodeRef
    n_tokens: int
    steer_url: str
    more_contexts_url: str


class Pagination(Doc):
    page: int
    per_page: int
    total: int
    pages: int
    start: int
    stop: int


class DocRow(Doc):
    doc: int
    id: str
    label: str | None
    tokens: int
    preview: str
    url: str


class DocList(Doc):
    label: str | None
    labels: list[str]
    pagination: Pagination
    docs: list[DocRow]


class TokenOut(Doc):
    """A token of running text: the gap before it, its own characters, its codes."""

    pos: int
    token_id: int
    gap: str
    text: str
    raw: str
    """The token's whole character span (byte-level pieces of one character share it)."""
    codes: list[CodeRef]


class CachedText(Doc):
    source: Literal["cache"]
    doc: int
    id: str
    label: str | None
    codebook: str | None
    codebooks: list[str]
    selected: int | None
    pagination: Pagination
    tokens: list[TokenOut]


class PastedText(Doc):
    source: Literal["pasted"]
    codebook: str | None
    codebooks: list[str]
    truncated: bool
    max_tokens: int
    tokens: list[TokenOut]


class EditOut(Doc):
    codebook: str
    codes: int | list[int]
    positions: str | int | list[int]
    action: Action
    slot: Slot
    scale: float
    head: int | None
    value: float | None


class SpecOut(Doc):
    edits: list[EditOut]


class SamplingOut(Doc):
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int


class GenerationOut(Doc):
    ids: list[int]
    """New token ids (without the prompt)."""
    text: str | None


class SteerResponse(Doc):
    prompt: str
    spec: SpecOut
    options: SamplingOut
    unsteered: list[GenerationOut]
    steered: list[GenerationOut]
    """Empty when the intervention has no edits."""
