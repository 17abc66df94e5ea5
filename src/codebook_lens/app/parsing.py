"""Turning requests into validated inputs: body limits, form bodies, steering requests, and
one readable line per validation error.

The typed models in ``schemas`` do the shape checks (FastAPI answers 422 when a request does
not fit them); this module does what the models cannot: bounded reading of bodies, the HTML
forms' conventions (empty field = default, ``codes='12, 40'``), and building the library's
``InterventionSpec`` (whose own checks give 400s with its messages).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from codebook_lens.app.config import AppConfig
from codebook_lens.codes.intervene import Generation, InterventionSpec, compare, parse_prompt


# ------------------------------------------------------------------- bodies
class BodyLimit:
    """ASGI middleware: refuse request bodies over a per-path byte limit with a 413.

    The body is read (at most ``limit + 1`` bytes) before the app sees it and then handed on
    unchanged, so no handler ever reads an unbounded body.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: dict[str, int],
        default: int,
        reject: Callable[[Request, int, str], Awaitable[Response]],
    ) -> None:
        self.app = app
        self.limits = limits
        self.default = default
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        too_large = f"request body too large; at most {limit} bytes are accepted"
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared and (not declared.isdigit() or int(declared) > limit):
            await (await self.reject(Request(scope), 413, too_large))(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await (await self.reject(Request(scope), 413, too_large))(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def read_form(body: bytes, model: type[BaseModel]) -> Any:
    """An ``application/x-www-form-urlencoded`` body validated by ``model`` (422 if it does not
    fit; the last value of a repeated field counts)."""
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"the form data is invalid ({e})") from None
    try:
        return model.model_validate({k: v[-1] for k, v in fields.items()})
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        ) from None


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """Status and one line per bad input: where it is, what was wrong (no echo of values).

    A body that is not JSON at all is a 400 (the request is malformed); anything else that
    does not fit the schema is a 422.
    """
    lines, status = [], 422
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            status = 400
            lines.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error')})")
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")]
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            lines.append("the request body must be a JSON object")
            continue
        lines.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid value')}")
    return status, "; ".join(lines) or "invalid request"


# ----------------------------------------------------------------- steering
@dataclass
class Steering:
    """A validated steering request: a prompt, the library's spec, and sampling options."""

    prompt: str
    """Text to continue (token ids separated by spaces for a model without a tokenizer)."""
    spec: InterventionSpec
    """The intervention (may be empty: then only unsteered samples)."""
    num_samples: int = 3
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def options(self) -> dict[str, Any]:
        """The sampling options (``SamplingOut``): every field but the prompt and the spec."""
        return {f.name: getattr(self, f.name) for f in fields(self)[2:]}

    def sample(self, model: Any, tokenizer: Any) -> tuple[list[Generation], list[Generation]]:
        """Unsteered and steered samples of the prompt (``intervene.compare``; paired draws)."""
        prompt = parse_prompt(tokenizer, self.prompt)
        return compare(model, tokenizer, prompt, self.spec, **self.options())


def _spec_from_text(text: str) -> InterventionSpec:
    return InterventionSpec.from_yaml(text, source="spec")  # YAML is a JSON superset


def steering_from_body(body: Any) -> Steering:
    """The JSON API's ``SteerRequest`` (already shape-checked) -> ``Steering``."""
    if body.spec is not None:
        spec = _spec_from_text(body.spec)
    else:
        spec = InterventionSpec.from_dict([e.model_dump() for e in body.edits], source="edits")
    return Steering(
        prompt=body.prompt,
        spec=spec,
        num_samples=body.num_samples,
        max_new_tokens=body.max_new_tokens,
        temperature=float(body.temperature),
        top_k=body.top_k,
        top_p=None if body.top_p is None else float(body.top_p),
        seed=body.seed,
    )


def _given(value: Any, default: Any) -> Any:
    return default if value == "" else value


def steering_from_form(form: Any) -> Steering:
    """The steering page's ``SteerForm`` -> ``Steering``.

    The spec is ``spec`` (YAML or JSON text) when given, else the single edit of the fields
    ``codebook``, ``codes`` (``"12, 40"``), ``head``, ``positions``, ``action``, ``slot``,
    ``scale``, ``value``, else nothing.
    """
    if not form.prompt.strip():
        raise ValueError("prompt is missing; give the text to continue")
    if form.spec.strip():
        spec = _spec_from_text(form.spec)
    elif form.codebook or form.codes.strip():
        codes = [int(c) for c in form.codes.replace(",", " ").split()]
        if not form.codebook or not codes:
            raise ValueError("give both codebook and codes (e.g. codes='12, 40') to steer")
        edit: dict[str, Any] = {"codebook": form.codebook, "codes": codes}
        for name in ("head", "positions", "action", "slot", "scale", "value"):
            if getattr(form, name) != "":
                edit[name] = getattr(form, name)
        for name in ("scale", "value"):
            if name in edit:
                edit[name] = float(edit[name])
        spec = InterventionSpec.from_dict([edit], source="edit")
    else:
        spec = InterventionSpec()
    top_p = _given(form.top_p, None)
    return Steering(
        prompt=form.prompt,
        spec=spec,
        num_samples=_given(form.num_samples, 3),
        max_new_tokens=_given(form.max_new_tokens, 40),
        temperature=float(_given(form.temperature, 1.0)),
        top_k=_given(form.top_k, None),
        top_p=None if top_p is None else float(top_p),
        seed=_given(form.seed, 0),
    )


def body_limits(config: AppConfig) -> dict[str, int]:
    """Bytes each POST path accepts: more than the largest request the schema allows (a
    character may take 12 bytes: a JSON surrogate-pair escape or 4 percent-encoded bytes)."""
    text = config.max_text_chars * 12 + 4096
    return {"/api/steer": 1 << 20, "/api/text": text, "/text": text}


def head_limit(form: type[BaseModel], headers: int = 16_384) -> int:
    """Bytes a request's head may take: the longest query ``form`` allows (12 bytes a
    character: 4 UTF-8 bytes, each percent-encoded) plus ``headers`` bytes for the rest."""
    chars = 0
    for name, prop in form.model_json_schema().get("properties", {}).items():
        lengths = [p.get("maxLength", 0) for p in [prop, *prop.get("anyOf", [])]]
        chars += len(name) + 2 + max([*lengths, 64])
    return 12 * chars + headers
