"""The published API is exact: ``/openapi.json`` is served and schemathesis fuzzes the whole app
against it (every operation, every check), three ways: in-process over a synthetic cache (no
model); in-process over a real cache with its tiny codebook model loaded (steering, pasted
text); and a real ``codebook-lens serve --model`` process over loopback.

The fuzz is bounded (fixed seed, a few examples per operation) so the file runs in about a
minute. One documented contract is configured: a request can have the schema's shape and still
be refused with a 400 because of what the schema cannot say (a regex that does not compile or
does not finish in time; an intervention that does not fit the model: a codebook, code, head
or position it does not have, spec text that does not parse, a prompt plus new tokens longer
than its context), so 400 counts as an accepted answer to schema-valid searches and steering
requests; every other check runs with its defaults.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.serving import serving

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")  # a dev dependency
from fastapi.testclient import TestClient  # noqa: E402
from helpers.synthetic import synthetic_cache  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from test_app import build_model_cache  # noqa: E402

from codebook_lens.app import AppConfig, create_app  # noqa: E402

BASE = "http://127.0.0.1"
SEED = 20_260_101
DEFAULT_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]


def _app(root: Path) -> Any:
    cache = synthetic_cache(
        root / "cache", n_tokens=3000, n_codebooks=2, num_codes=16, k=2, groups=2, plant={"May": 7}
    )
    return create_app(AppConfig(str(cache.path), regex_timeout=0.5, search_workers=0), cache=cache)


def _config(max_examples: int) -> Any:
    """Schemathesis settings: every check, positive and negative cases, the 400 contract."""
    from schemathesis.config import SchemathesisConfig

    content_refused = ["GET /api/search", "GET /search", "POST /api/steer", "GET /steer"]
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "headers": {"Host": "127.0.0.1"},
            "request-timeout": 60,
            "generation": {"max-examples": max_examples, "mode": "all"},
            "operations": [
                {
                    "include-name": name,
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": [*DEFAULT_ACCEPTED, "400"]
                        }
                    },
                }
                for name in content_refused
            ],
        }
    )


def _schema(app: Any, max_examples: int = 12) -> Any:
    return schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=_config(max_examples), headers={"Host": "127.0.0.1"}
    )


# Built at import: schemathesis makes one test per operation from the schema at collection.
_ROOT = tempfile.TemporaryDirectory(prefix="codebook-lens-schema-")
APP = _app(Path(_ROOT.name))
APP.state.lens.plot("summary")  # draw the plots now, not inside one fuzzed request
schema = _schema(APP)


@pytest.fixture(scope="module")
def app() -> Any:
    return APP


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_app_conforms_to_its_schema(case: Any) -> None:
    case.call_and_validate(headers={"Host": "127.0.0.1"})


# ------------------------------------------------- with the model, in-process
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny GPT-2 with codebooks (saved with its tokenizer) and the cache it built."""
    return build_model_cache(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model_app_schema(model_dirs: tuple[Path, Path]) -> Iterator[Any]:
    model_dir, cache_dir = model_dirs
    config = AppConfig(
        str(cache_dir),
        model_dir=str(model_dir),
        regex_timeout=0.5,
        search_workers=0,
        # small limits keep each request fast (the schema states them, the fuzz follows)
        max_new_tokens=8,
        max_samples=2,
        max_prompt_chars=400,
        max_text_chars=2000,
    )
    app = create_app(config)
    app.state.lens.plot("summary")
    yield _schema(app, max_examples=6)
    app.state.lens.close()


def fuzz(schema: Any, **call: Any) -> None:
    """Every operation of ``schema`` fuzzed as ``schema.parametrize()`` would (all phases and
    checks); fails listing each operation that failed, with schemathesis's report.

    For a schema built in a fixture: ``schemathesis.pytest.from_fixture`` would do this, but it
    sets ``Function._nodeid``, which pytest 9 no longer has.
    """
    from schemathesis.pytest.lazy import get_all_tests

    def check(case: Any) -> None:
        case.call_and_validate(headers={"Host": "127.0.0.1"}, **call)

    failures, ran = [], 0
    for result in get_all_tests(schema=schema, test_func=check, settings=FUZZ, given_kwargs={}):
        operation, test = result.ok()
        ran += 1
        try:
            test()
        except Exception as e:  # a FailureGroup: every failed check of the operation
            failures.append(f"{operation.label}:\n{e}")
    assert ran >= 9, f"only {ran} operations were fuzzed"
    assert not failures, "\n\n".join(failures)


FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def test_app_with_model_conforms_to_its_schema(model_app_schema: Any) -> None:
    fuzz(model_app_schema)


# --------------------------------------------------- the real server, loopback
@pytest.fixture(scope="module")
def served(
    model_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``codebook-lens serve CACHE --model DIR`` on a free loopback port; yields its base URL."""
    model_dir, cache_dir = model_dirs
    log = tmp_path_factory.mktemp("log") / "server.log"
    extra = ["--host", "127.0.0.1", "--max-new-tokens", "8", "--search-workers", "0"]
    with serving(
        cache_dir, model_dir, log, extra=[*extra, "--regex-timeout", "0.5"], threads=1
    ) as base:
        yield base
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def test_served_app_conforms_to_its_schema(served: str) -> None:
    fuzz(schemathesis.openapi.from_url(served + "/openapi.json", config=_config(3)), timeout=60)


def test_served_steer_page_takes_the_longest_query(served: str) -> None:
    """The steering page is a GET form: the longest query its schema allows (every field at its
    longest, 4-byte characters percent-encoded) reaches the app, past the HTTP parser's limit."""
    import requests

    spec = requests.get(served + "/openapi.json", timeout=30).json()
    longest = {}  # every free-text field at its maximum length ("codes" takes digits only)
    for param in spec["paths"]["/steer"]["get"]["parameters"]:
        n = max(v.get("maxLength", 0) for v in _variants(param))
        if n and param["name"] != "codes":
            longest[param["name"]] = "\N{MUSICAL SYMBOL G CLEF}" * n
    assert len(longest["prompt"]) == 2000 and len(longest["spec"]) == 20_000
    r = requests.get(served + "/steer", params=longest, headers={"Host": "127.0.0.1"}, timeout=60)
    assert r.headers["content-type"].startswith("text/html"), r.text[:300]
    assert "codebook-lens" in r.text  # the app's page (its error above the form), not the parser's
    assert r.status_code in (200, 400), r.status_code


def _variants(param: dict[str, Any]) -> list[dict[str, Any]]:
    schema = param.get("schema", {})
    return [schema, *schema.get("anyOf", [])]


# ------------------------------------------------------------ hand-written
def test_schema_is_served_and_complete(app: Any) -> None:
    client = TestClient(app, base_url=BASE)
    spec = client.get("/openapi.json").json()
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert {
        ("GET", "/api/overview"),
        ("GET", "/api/search"),
        ("GET", "/api/code/{codebook}/{code}"),
        ("GET", "/api/docs"),
        ("GET", "/api/text"),
        ("POST", "/api/text"),
        ("POST", "/api/steer"),
        ("POST", "/text"),
        ("GET", "/steer"),
    } <= ops
    for path, item in spec["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            assert {"400", "500"} <= set(op["responses"]), where
            if not path.startswith("/api/"):
                continue
            ok = op["responses"]["200"]["content"]["application/json"]["schema"]
            assert "$ref" in ok, f"{where}: untyped answer"
            for status, r in op["responses"].items():
                if status != "200":
                    ref = r["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody"), where
            if method == "post":
                assert "$ref" in op["requestBody"]["content"]["application/json"]["schema"], where
    steer = spec["components"]["schemas"]["SteerRequest"]
    assert steer["properties"]["num_samples"]["maximum"] == 8  # the server's own limits
    assert steer["additionalProperties"] is False


def test_docs_page_lists_every_operation(app: Any) -> None:
    client = TestClient(app, base_url=BASE)
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for op in ("GET /api/search", "POST /api/steer", "GET /api/code/{codebook}/{code}"):
        assert f"<code>{op}</code>" in page.text
    assert "<script>" not in page.text  # no inline scripts (the CSP forbids them), no CDN
    assert "cdn" not in page.text.lower()


def test_schema_and_docs_are_loopback_only(app: Any) -> None:
    client = TestClient(app, base_url=BASE)
    for path in ("/openapi.json", "/docs"):
        r = client.get(path, headers={"host": "evil.example"})
        assert r.status_code == 400 and "evil.example" in r.text, path
