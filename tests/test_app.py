"""The web app's HTTP API and pages, against caches built in the test.

Two caches: a synthetic one with a planted code (code 7 of ``layers.0.mlp_out`` fires exactly
on "May"), served without a model; and a real one written by a tiny codebook model, served with
that model (pasted text, steering, promoted tokens). Every number the app returns is checked
against the library called directly, and the planted code against its known precision/recall.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")  # the `app` extra; `make test` installs it
from fastapi.testclient import TestClient  # noqa: E402
from helpers.synthetic import synthetic_cache  # noqa: E402

from codebook_lens import CodebookConfig, attach_codebooks  # noqa: E402
from codebook_lens.app import AppConfig, create_app  # noqa: E402
from codebook_lens.codes.cache import build_cache  # noqa: E402

BASE = "http://127.0.0.1"

TEXTS = [
    ("weather", "In May the rain falls. It may rain in May, or in June, says the forecast."),
    ("sport", "The team won the match in May after a late goal. Fans sang in the rain."),
    ("politics", "The minister spoke about <script>alert(1)</script> & taxes in March."),
    ("business", "Shares fell in March; the £ market recovered by May, traders said."),
]


@dataclass
class Doc:
    id: str
    text: str
    label: str | None


def tiny_docs(repeat: int = 3) -> list[Doc]:
    return [Doc(f"{lab}-{r}", t, lab) for r in range(repeat) for lab, t in TEXTS]


def tiny_tokenizer() -> Any:
    """A byte-level BPE fast tokenizer trained offline on ``TEXTS`` in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tok.train_from_iterator([t for _, t in TEXTS] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_codebook_model(vocab: int) -> Any:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64, eos_token_id=0)
    )
    base.eval()
    cfg = CodebookConfig(num_codes=16, k=2, placements=["attn_heads", "mlp_out"])
    return attach_codebooks(base, cfg)


def build_model_cache(root: Path) -> tuple[Path, Path]:
    """Save a tiny codebook model (with tokenizer) and build its cache; returns both folders."""
    tok = tiny_tokenizer()
    model = tiny_codebook_model(len(tok))
    model.save_pretrained(root / "model", tokenizer=tok)
    build_cache(model, tok, tiny_docs(), root / "cache", seq_len=16, progress=False)
    return root / "model", root / "cache"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("planted")
    return synthetic_cache(
        root / "cache", n_tokens=6000, n_codebooks=2, num_codes=32, k=2, plant={"May": 7}
    )


@pytest.fixture(scope="module")
def client(planted: Any) -> TestClient:
    app = create_app(AppConfig(str(planted.path), regex_timeout=0.5), cache=planted)
    return TestClient(app, base_url=BASE, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, Any]:
    model_dir, cache_dir = build_model_cache(tmp_path_factory.mktemp("real"))
    app = create_app(AppConfig(str(cache_dir), model_dir=str(model_dir), search_workers=1))
    return TestClient(app, base_url=BASE, raise_server_exceptions=False), app.state.lens


def ok(response: Any) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response: Any, status: int) -> str:
    """The message of a JSON error response with ``status`` (and no stack trace)."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert body["error"]["status"] == status
    return str(body["error"]["message"])


# -------------------------------------------------------------------- search
def test_planted_code_ranks_first_with_perfect_scores(client: TestClient, planted: Any) -> None:
    data = ok(client.get("/api/search", params={"q": r"\bMay\b", "kind": "regex"}))
    may = [p for p in range(planted.n_tokens) if planted.token_text(p) == "May"]
    assert data["pattern_tokens"] == len(may) > 0
    first = data["results"][0]
    assert first["codebook"] == "layers.0.mlp_out"
    top = first["matches"][0]
    assert (top["code"], top["precision"], top["recall"], top["f1"]) == (7, 1.0, 1.0, 1.0)
    assert top["count"] == top["hits"] == len(may)
    assert top["url"] == "/code/layers.0.mlp_out/7"
    # the token search finds the same code
    tok = ok(client.get("/api/search", params={"q": "May", "kind": "token"}))
    assert tok["results"][0]["matches"][0]["code"] == 7


def test_search_equals_library_and_pages_continue(client: TestClient, planted: Any) -> None:
    from codebook_lens.codes.search import make_pattern, search

    pattern = make_pattern(planted, regex=r"\b(the|of)\b")
    want = search(planted, pattern, codebooks=["layers.1.mlp_out"], top=None, sort_by="recall")
    got: list[dict[str, Any]] = []
    for page in (1, 2, 3):
        data = ok(
            client.get(
                "/api/search",
                params={
                    "q": r"\b(the|of)\b",
                    "codebook": "layers.1.mlp_out",
                    "sort": "recall",
                    "page": page,
                    "per_page": 5,
                },
            )
        )
        assert [s["codebook"] for s in data["results"]] == ["layers.1.mlp_out"]
        got += data["results"][0]["matches"]
        assert data["has_next"] == (page * 5 < len(want.matches))
    assert len(got) == 15
    for g, w in zip(got, want.matches[:15], strict=True):
        for key in ("codebook", "code", "head", "precision", "recall", "f1", "count", "hits"):
            assert g[key] == getattr(w, key), key


def test_search_topic_and_thresholds(client: TestClient, planted: Any) -> None:
    data = ok(client.get("/api/search", params={"q": "sport", "kind": "topic", "per_page": 50}))
    n_sport = sum(d.end - d.start for d in planted.docs if d.label == "sport")
    assert data["pattern_tokens"] == n_sport
    strict = ok(
        client.get(
            "/api/search",
            params={"q": "sport", "kind": "topic", "min_precision": 0.5, "per_page": 50},
        )
    )
    for section in strict["results"]:
        assert all(m["precision"] >= 0.5 for m in section["matches"])
    unknown = client.get("/api/search", params={"q": "cooking", "kind": "topic"})
    assert "cooking" in error_of(unknown, 404)


def test_search_page_html_links_to_codes(client: TestClient) -> None:
    r = client.get("/search", params={"q": r"\bMay\b"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'href="/code/layers.0.mlp_out/7"' in r.text
    assert "1.000" in r.text
    assert client.get("/search").status_code == 200  # the empty form
    one = client.get(
        "/search",
        params={"q": r"\bthe\b", "codebook": "layers.1.mlp_out", "per_page": 5, "page": 2},
    ).text
    assert 'rel="next"' in one and "page=3" in one and 'rel="prev"' in one and "page=1" in one


@pytest.mark.parametrize(
    ("params", "status", "needle"),
    [
        ({"q": "(unclosed"}, 400, "invalid"),
        ({"q": ""}, 422, "q:"),
        ({"q": "  "}, 422, "q:"),
        ({"q": "x" * 501}, 422, "q:"),
        ({"q": "May", "kind": "soundex"}, 422, "kind"),
        ({"q": "May", "per_page": 100_000}, 422, "per_page"),
        ({"q": "May", "page": 0}, 422, "page"),
        ({"q": "May", "min_precision": 2}, 422, "min_precision"),
        ({"q": "May", "codebook": "layers.9.nothing"}, 404, "layers.9.nothing"),
    ],
)
def test_search_rejects_bad_input(
    client: TestClient, params: dict[str, Any], status: int, needle: str
) -> None:
    assert needle in error_of(client.get("/api/search", params=params), status)


def test_catastrophic_regex_times_out(tmp_path: Path) -> None:
    from codebook_lens.codes.cache import CacheWriter, CodebookInfo

    info = CodebookInfo("layers.0.mlp_out", "mlp_out", 0, 1, False, 1, 4, 8)
    with CacheWriter(tmp_path / "c", codebooks=[info], identity={}, vocab=["a"]) as w:
        for d in range(4):
            w.add_document(f"d{d}", "a" * 5000 + "!")
            n = 5001
            w.add_tokens(
                np.zeros(n, np.int32),
                np.stack([np.arange(n), np.arange(n) + 1], 1).astype(np.int32),
                {"layers.0.mlp_out": np.zeros((n, 1), np.uint8)},
            )
        cache = w.finish()
    app = create_app(AppConfig(str(cache.path), regex_timeout=0.2, search_workers=1), cache=cache)
    c = TestClient(app, base_url=BASE, raise_server_exceptions=False)
    app.state.lens.searches.start()  # the worker process is up: time only the search
    t = time.monotonic()
    r = c.get("/api/search", params={"q": r"(a+)+$"})
    assert "timed out" in error_of(r, 400)
    assert time.monotonic() - t < 10
    html = c.get("/search", params={"q": r"(a+)+$"})
    assert html.status_code == 400 and "timed out" in html.text and "<html" in html.text


# ---------------------------------------------------------------------- code
def test_code_page_highlights_the_firing_token(client: TestClient, planted: Any) -> None:
    from codebook_lens.codes.search import code_profile

    data = ok(client.get("/api/code/layers.0.mlp_out/7", params={"contexts": 8}))
    want = code_profile(planted, "layers.0.mlp_out", 7, n_contexts=8).to_dict()
    for key in ("count", "frequency", "usage_rank", "tokens", "labels"):
        assert data[key] == want[key], key
    assert len(data["contexts"]) == 8
    for ctx in data["contexts"]:
        assert ctx["token"] == "May" == planted.token_text(ctx["position"])
        assert ctx["doc_url"] == f"/text?doc={ctx['doc']}&pos={ctx['position']}"
    assert [s["code"] for s in data["similar"]] == [s["code"] for s in want["similar"]]
    assert data["similar"][0]["url"].startswith("/code/layers.0.mlp_out/")
    assert data["promoted"] is None  # no model
    page = client.get("/code/layers.0.mlp_out/7").text
    marks = re.findall(r'<mark class="hit"[^>]*>(.*?)</mark>', page)
    assert marks and set(marks) == {"May"}
    assert ("more contexts" in page) == (data["count"] > 20)  # 20 shown by default
    assert len(marks) == min(20, data["count"])


def test_code_addresses_are_checked(client: TestClient) -> None:
    assert "out of range" in error_of(client.get("/api/code/layers.0.mlp_out/32"), 404)
    assert "not in this cache" in error_of(client.get("/api/code/layers.7.mlp_out/1"), 404)
    assert "head" in error_of(client.get("/api/code/layers.0.mlp_out/1?head=1"), 404)
    error_of(client.get("/api/code/layers.0.mlp_out/-1"), 422)
    error_of(client.get("/api/code/layers.0.mlp_out/abc"), 422)
    r = client.get("/code/layers.0.mlp_out/99")
    assert r.status_code == 404 and "out of range" in r.text and "<html" in r.text


# ---------------------------------------------------------------------- text
def test_document_tokens_and_codes(client: TestClient, planted: Any) -> None:
    d = planted.docs[3]
    data = ok(client.get("/api/text", params={"doc": 3, "per_page": 50, "page": 2}))
    assert data["pagination"]["total"] == d.end - d.start
    toks = data["tokens"]
    assert [t["pos"] for t in toks] == list(range(d.start + 50, d.start + 100))
    codes = np.asarray(planted.codes("layers.0.mlp_out"))
    for t in toks:
        assert t["raw"] == planted.token_text(t["pos"])
        mine = [c["code"] for c in t["codes"] if c["codebook"] == "layers.0.mlp_out"]
        assert mine == codes[t["pos"], 0].tolist()
    # every page's gaps and texts spell out the document exactly
    text = ""
    for page in (1, 2, 3, 4):
        part = ok(client.get("/api/text", params={"doc": 3, "per_page": 60, "page": page}))
        text += "".join(t["gap"] + t["text"] for t in part["tokens"])
    assert text == d.text[: len(text)] and len(text) >= int(planted.offsets[d.end - 1][1]) - 1


def test_position_opens_its_page_and_is_marked(client: TestClient, planted: Any) -> None:
    d = planted.docs[1]
    pos = d.start + 130
    data = ok(client.get("/api/text", params={"doc": 1, "pos": pos, "per_page": 100}))
    assert data["pagination"]["page"] == 2 and data["selected"] == pos
    page = client.get("/text", params={"doc": 1, "pos": pos, "per_page": 100}).text
    assert f'class="tok sel" data-pos="{pos}"' in page
    assert "not in document" in error_of(client.get("/api/text?doc=1&pos=0"), 404)
    assert "out of range" in error_of(client.get("/api/text?doc=999"), 404)
    assert "past the end" in error_of(client.get("/api/text?doc=1&page=99"), 404)


def test_text_pages_are_bounded(tmp_path: Path) -> None:
    big = synthetic_cache(
        tmp_path / "c", n_tokens=4000, n_codebooks=3, num_codes=64, k=8, groups=8, doc_tokens=4000
    )  # 3 x 8 heads x 8 = 192 codes per token
    app = create_app(AppConfig(str(big.path), search_workers=0), cache=big)
    c = TestClient(app, base_url=BASE)
    msg = error_of(c.get("/api/text", params={"doc": 0, "per_page": 2000}), 400)
    assert "choose one codebook or show at most 520 tokens" in msg
    one = ok(
        c.get("/api/text", params={"doc": 0, "per_page": 1500, "codebook": "layers.0.attn_heads"})
    )
    assert len(one["tokens"]) == 1500 and len(one["tokens"][0]["codes"]) == 64
    msg = error_of(
        c.get("/api/text", params={"doc": 0, "per_page": 2000, "codebook": "layers.0.attn_heads"}),
        400,
    )
    assert "show at most 1562 tokens" in msg and "choose one codebook" not in msg


def test_document_list_paginates(client: TestClient, planted: Any) -> None:
    first = ok(client.get("/api/docs", params={"per_page": 10}))
    assert first["pagination"]["total"] == planted.n_docs
    second = ok(client.get("/api/docs", params={"per_page": 10, "page": 2}))
    assert [d["doc"] for d in first["docs"] + second["docs"]] == list(range(20))
    tech = ok(client.get("/api/docs", params={"label": "tech", "per_page": 200}))
    assert {d["label"] for d in tech["docs"]} == {"tech"}
    assert "/text?doc=" in client.get("/text").text


def test_overview_matches_library_health(client: TestClient, planted: Any) -> None:
    from codebook_lens.codes.analysis import codebook_health

    data = ok(client.get("/api/overview"))
    assert data["cache"]["n_tokens"] == planted.n_tokens
    assert data["steer"] is False and data["model"]["loaded"] is False
    assert data["labels"] == ["business", "sport", "tech"]
    for got, want in zip(data["codebooks"], codebook_health(planted), strict=True):
        for key in ("codebook", "dead_codes", "entropy", "perplexity", "hist_counts"):
            assert got[key] == getattr(want, key)
    page = client.get("/")
    assert page.status_code == 200 and "layers.1.mlp_out" in page.text
    png = client.get(data["codebooks"][0]["plot_url"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/plots/nothing.png").status_code == 404


def test_steer_form_shows_errors_in_place(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    r = client.get("/steer", params={"prompt": "In May", "codebook": "nope", "codes": "1"})
    assert r.status_code == 400 and 'id="steer-error"' in r.text and "nope" in r.text
    assert 'id="steer-form"' in r.text and "In May" in r.text  # the form keeps its input


def test_steering_and_pasted_text_need_a_model(client: TestClient) -> None:
    r = client.post("/api/steer", json={"prompt": "In May", "edits": []})
    assert "--model" in error_of(r, 409)
    assert "--model" in error_of(client.post("/api/text", json={"text": "In May"}), 409)
    assert "needs the model" in client.get("/steer").text


# --------------------------------------------------------- with a real model
def test_pasted_text_codes_equal_a_forward_pass(served: tuple[TestClient, Any]) -> None:
    from codebook_lens.codes.intervene import run_with_codes

    client, lens = served
    text = "In May the team won."
    data = ok(client.post("/api/text", json={"text": text, "codebook": "all"}))
    ids = lens.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t["token_id"] for t in data["tokens"]] == ids
    assert "".join(t["gap"] + t["text"] for t in data["tokens"]) == text
    want = run_with_codes(lens.model, ids).codes
    for i, t in enumerate(data["tokens"]):
        heads = [c for c in t["codes"] if c["codebook"] == "layers.1.attn_heads"]
        assert [c["code"] for c in heads] == want["layers.1.attn_heads"][0, i].reshape(-1).tolist()
        assert [c["head"] for c in heads] == [h for h in range(4) for _ in range(2)]
    page = client.post("/text", data={"text": text, "codebook": "layers.0.mlp_out"})
    assert page.status_code == 200 and page.text.count('class="tok') == len(ids)
    too_long = client.post("/api/text", json={"text": "a" * 20_001})
    assert "at most 20000" in error_of(too_long, 422)


def test_steering_equals_library_and_changes_generation(served: tuple[TestClient, Any]) -> None:
    from codebook_lens.codes.intervene import InterventionSpec, compare

    client, lens = served
    edit = {"codebook": "layers.1.mlp_out", "codes": [3], "scale": 8.0}
    body = {
        "prompt": "In May",
        "edits": [edit],
        "max_new_tokens": 6,
        "num_samples": 2,
        "temperature": 0,
        "seed": 1,
    }
    data = ok(client.post("/api/steer", json=body))
    spec = InterventionSpec.from_dict([edit])
    plain, steered = compare(
        lens.model,
        lens.tokenizer,
        "In May",
        spec,
        num_samples=2,
        max_new_tokens=6,
        temperature=0.0,
        seed=1,
    )
    assert [g["ids"] for g in data["unsteered"]] == [g.ids for g in plain]
    assert [g["ids"] for g in data["steered"]] == [g.ids for g in steered]
    assert data["steered"][0]["ids"] != data["unsteered"][0]["ids"]
    assert data["spec"]["edits"][0]["codebook"] == "layers.1.mlp_out"
    # the page takes the same request as form fields, or a YAML spec
    page = client.get(
        "/steer",
        params={
            "prompt": "In May",
            "codebook": "layers.1.mlp_out",
            "codes": "3",
            "scale": "8",
            "max_new_tokens": 6,
            "num_samples": 2,
            "temperature": 0,
            "seed": 1,
        },
    )
    assert page.status_code == 200
    assert page.text.count('class="gen"') == 4
    yaml_spec = "edits:\n  - codebook: layers.1.mlp_out\n    codes: [3]\n    scale: 8.0\n"
    via_yaml = ok(client.post("/api/steer", json={**body, "edits": [], "spec": yaml_spec}))
    assert via_yaml["steered"] == data["steered"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (
            {"prompt": "x", "edits": [{"codebook": "layers.5.mlp_out", "codes": [1]}]},
            400,
            "layers.5",
        ),
        ({"prompt": "x", "edits": [{"codebook": "layers.0.mlp_out", "codes": [99]}]}, 400, "99"),
        (
            {"prompt": "x", "edits": [{"codebook": "layers.0.attn_heads", "codes": 1, "head": 9}]},
            400,
            "head",
        ),
        (
            {
                "prompt": "x",
                "edits": [{"codebook": "layers.0.mlp_out", "codes": 1, "positions": 50}],
            },
            400,
            "past the sequence",
        ),
        ({"prompt": "x", "spec": "edits: [unclosed"}, 400, "YAML"),
        ({"prompt": "x", "num_samples": 99}, 422, "num_samples"),
        ({"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"prompt": "x", "temperature": "hot"}, 422, "temperature"),
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "x" * 2001}, 422, "at most 2000"),
        (
            {"prompt": "x", "edits": [{"codebook": "layers.0.mlp_out", "codes": "one"}]},
            422,
            "codes",
        ),
        (
            {"prompt": "x", "edits": [{"codebook": "layers.0.mlp_out", "codes": [1, 1]}]},
            422,
            "twice",
        ),
        ({"prompt": "x", "codebook": "layers.0.mlp_out", "codes": [1]}, 422, "codebook"),
    ],
)
def test_steering_rejects_bad_requests(
    served: tuple[TestClient, Any], body: dict[str, Any], status: int, needle: str
) -> None:
    client, _ = served
    assert needle in error_of(client.post("/api/steer", json=body), status)


def test_code_page_with_model_has_promoted_tokens(served: tuple[TestClient, Any]) -> None:
    from codebook_lens.codes.analysis import promoted_tokens

    client, lens = served
    data = ok(client.get("/api/code/layers.1.mlp_out/2"))
    want, _ = promoted_tokens(lens.model, lens.cache, "layers.1.mlp_out", 2, top=20)
    assert want is not None
    assert [t["token_id"] for t in data["promoted"]] == [t.token_id for t in want]
    assert data["steer_url"] == "/steer?codebook=layers.1.mlp_out&codes=2"
    heads = ok(client.get("/api/code/layers.0.attn_heads/2", params={"head": 3}))
    assert heads["head"] == 3 and heads["ref"]["url"] == "/code/layers.0.attn_heads/2?head=3"
    assert "head" in error_of(client.get("/api/code/layers.0.attn_heads/2"), 404)


def test_user_text_is_escaped(served: tuple[TestClient, Any]) -> None:
    client, lens = served
    doc = next(i for i, d in enumerate(lens.cache.docs) if "<script>" in d.text)
    page = client.get("/text", params={"doc": doc}).text
    # the tokens spell "<script>" but the page only holds escaped text
    assert page.count("<script") == 1 and "app.js" in page  # only our own script tag
    assert "&lt;" in page and "&gt;" in page
    r = client.get("/search", params={"q": "<script>alert(1)</script>", "kind": "token"})
    assert r.status_code == 200 and "<script>alert(1)" not in r.text


# -------------------------------------------------------------------- safety
@pytest.mark.parametrize(
    "path",
    [
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/..%2fserver.py",
        "/static/%2e%2e/%2e%2e/cache.py",
        "/static//etc/passwd",
        "/plots/..%2f..%2fmanifest.png",
        "/plots/%2e%2e.png",
        "/manifest.json",
        "/codes/layers.0.mlp_out.npy",
    ],
)
def test_no_path_traversal(client: TestClient, path: str) -> None:
    # send the path exactly as written (no client-side normalisation of "..")
    request = client.build_request("GET", BASE + "/")
    request.url = request.url.copy_with(raw_path=path.encode())
    r = client.send(request)
    assert r.status_code in (400, 404), (path, r.status_code)
    for secret in ("import ", "root:", '"format"', "NUMPY"):
        assert secret not in r.text


def test_static_files_are_served(client: TestClient) -> None:
    r = client.get("/static/style.css")
    assert r.status_code == 200 and "--accent" in r.text
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in r.headers["content-security-policy"]


def test_foreign_hosts_and_cross_site_posts_are_refused(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    r = client.get("/api/overview", headers={"host": "evil.example"})
    assert "evil.example" in error_of(r, 400)
    assert client.get("/api/overview", headers={"host": "localhost:8000"}).status_code == 200
    r = client.post("/api/steer", json={"prompt": "x"}, headers={"origin": "http://evil.example"})
    assert "cross-site" in error_of(r, 403)


def test_request_size_limits(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    as_json = {"content-type": "application/json"}
    r = client.post("/api/steer", content=b"{" + b" " * (1 << 20) + b"}", headers=as_json)
    assert "too large" in error_of(r, 413)
    r = client.post("/api/text", content=b"{" + b" " * 300_000 + b"}", headers=as_json)
    assert "too large" in error_of(r, 413)
    page = client.post("/text", content=b"text=" + b"a" * 300_000)
    assert page.status_code == 413 and "too large" in page.text and "<html" in page.text
    chunks = (b" " * 65_536 for _ in range(20))  # no content-length: counted as it arrives
    r = client.post("/api/steer", content=chunks, headers=as_json)
    assert "too large" in error_of(r, 413)
    bad = client.post("/api/steer", content=b"{nope", headers=as_json)
    assert "not valid JSON" in error_of(bad, 400)
    assert "JSON object" in error_of(client.post("/api/steer", json=[1, 2]), 422)


def test_errors_are_pages_or_json_never_tracebacks(client: TestClient) -> None:
    html = client.get("/no/such/page")
    assert html.status_code == 404 and "<html" in html.text and "no page at" in html.text
    assert "no page at" in error_of(client.get("/api/nothing"), 404)
    r = client.post("/api/overview")
    assert "POST is not allowed" in error_of(r, 405) and r.headers["allow"] == "GET"
    r = client.put("/api/text")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = client.delete("/search")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and "<html" in r.text
    lens = client.app.state.lens  # type: ignore[attr-defined]
    original = lens.overview

    def broken() -> None:
        raise RuntimeError("secret internal detail")

    lens.overview = broken
    try:
        for path in ("/", "/api/overview"):
            r = client.get(path)
            assert r.status_code == 500
            assert "secret internal detail" not in r.text and "Traceback" not in r.text
            assert "internal error" in r.text
    finally:
        lens.overview = original


def test_config_and_request_validation() -> None:
    from codebook_lens.app.parsing import steering_from_form
    from codebook_lens.app.schemas import request_models

    with pytest.raises(ValueError, match="port"):
        AppConfig("c", port=70_000)
    with pytest.raises(ValueError, match="page_size"):
        AppConfig("c", page_size=500, max_page_size=100)
    with pytest.raises(ValueError, match="regex_timeout"):
        AppConfig("c", regex_timeout=0)
    with pytest.raises(ValueError, match="search_workers"):
        AppConfig("c", search_workers=-1)
    cfg = AppConfig("c", max_samples=4)
    form_model = request_models(cfg).steer_form
    fields = {"prompt": "hi", "codebook": "layers.0.mlp_out", "codes": "1, 2", "head": ""}
    req = steering_from_form(form_model.model_validate({**fields, "temperature": "0.5"}))
    assert req.spec.edits[0].codes == [1, 2] and req.spec.edits[0].head is None
    assert req.temperature == 0.5 and req.num_samples == 3
    with pytest.raises(ValueError, match="both codebook and codes"):
        steering_from_form(form_model.model_validate({"prompt": "hi", "codes": "1"}))
    with pytest.raises(ValueError, match="num_samples"):  # the limit comes from the config
        form_model.model_validate({"prompt": "hi", "num_samples": "5"})


def test_missing_cache_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such cache folder"):
        create_app(AppConfig(str(tmp_path / "nothing")))


def test_app_refuses_a_cache_that_fails_its_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from codebook_lens.cli import main

    cache = synthetic_cache(tmp_path / "c", n_tokens=2000, n_codebooks=1, num_codes=8, k=1)
    tokens = np.asarray(cache.tokens)
    np.save(tmp_path / "c" / "tokens.npy", tokens[:10])  # disagrees with manifest.json
    with pytest.raises(ValueError, match=r"tokens\.npy: expected shape \(2000,\)"):
        create_app(AppConfig(str(tmp_path / "c"), search_workers=0))
    # the command says the same and exits 2 before anything listens
    assert main(["serve", str(tmp_path / "c"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "tokens.npy: expected shape (2000,)" in err and "found (10,)" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_load_benchmark_runs_in_tiny_mode() -> None:
    """The load check starts the real server, fires concurrent searches, checks every answer."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_app.py"), "--tiny"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "correct: 20/20" in proc.stdout and "p95 / limit" in proc.stdout
