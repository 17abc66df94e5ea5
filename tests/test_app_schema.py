"""The published API is exact: ``/openapi.json`` is served and schemathesis fuzzes the whole app
against it (every operation, every check) on a synthetic cache, in-process.

The fuzz is bounded (fixed seed, a few examples per operation) so it runs in well under a
minute. One documented contract is configured: a request can have the schema's shape and
still be refused with a 400 because of what the schema cannot say (a regex that does not
compile, or does not finish in time), so 400 counts as an accepted answer to schema-valid
searches; every other check runs with its defaults.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")  # a dev dependency
from fastapi.testclient import TestClient  # noqa: E402
from helpers.synthetic import synthetic_cache  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from codebook_lens.app import AppConfig, create_app  # noqa: E402

BASE = "http://127.0.0.1"
SEED = 20_260_101
DEFAULT_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]


def _app(root: Path) -> Any:
    cache = synthetic_cache(
        root / "cache", n_tokens=3000, n_codebooks=2, num_codes=16, k=2, groups=2, plant={"May": 7}
    )
    return create_app(AppConfig(str(cache.path), regex_timeout=0.5, search_workers=0), cache=cache)


def _schema(app: Any) -> Any:
    from schemathesis.config import SchemathesisConfig

    searches = ["GET /api/search", "GET /search"]
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "headers": {"Host": "127.0.0.1"},
            "request-timeout": 60,
            "generation": {"max-examples": 12, "mode": "all"},
            "operations": [
                {
                    "include-name": name,
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": [*DEFAULT_ACCEPTED, "400"]
                        }
                    },
                }
                for name in searches
            ],
        }
    )
    return schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=config, headers={"Host": "127.0.0.1"}
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
