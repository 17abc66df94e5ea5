"""End to end in a real browser: `codebook-lens serve` in a subprocess, headless Chromium.

Debian's ``chromium`` driven by Playwright for Python (``executable_path=/usr/bin/chromium``;
no ``playwright install``, which downloads browsers). ``make test`` installs Chromium; when it
is missing this test FAILS (it never skips), so a CI machine without a browser is noticed.
Screenshots go to a temporary folder (``CODEBOOK_LENS_SCREENSHOTS=DIR`` keeps them in DIR).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.saes import build_sae_cache
from helpers.serving import serving
from test_app import build_model_cache
from test_saes_cache import SPARSIFY, best_latent

from codebook_lens.codes.cache import CodeCache

CHROMIUM = os.environ.get("CODEBOOK_LENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HIGHLIGHT = "rgb(255, 213, 74)"  # --hit in static/style.css

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`codebook-lens serve CACHE --model DIR` on a free loopback port; yields its base URL."""
    model_dir, cache_dir = build_model_cache(tmp_path_factory.mktemp("browser"))
    with serving(cache_dir, model_dir, tmp_path_factory.mktemp("log") / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def sae_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A cache of a sparsify and a SAELens SAE over a plain model, served with that model
    (the SAEs are loaded again from the manifest); yields the URL and a token to search."""
    paths = build_sae_cache(tmp_path_factory.mktemp("browser-saes"))
    latent, token = best_latent(CodeCache(paths["cache"]), SPARSIFY)
    log = tmp_path_factory.mktemp("log") / "sae-server.log"
    with serving(paths["cache"], paths["model"], log) as base:
        yield base, token


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keep = os.environ.get("CODEBOOK_LENS_SCREENSHOTS")
    path = Path(keep) if keep else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: install it with "
            "`apt-get install -y chromium` (make test does this); the browser test must run"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    problems: list[str] = []
    # CSP violations and script errors show up here; a clean page has none.
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.problems = problems
    yield pg
    context.close()


def test_search_open_code_and_steer(server: str, page: Any, shots: Path) -> None:
    page.goto(server + "/")
    assert page.locator("#health tbody tr").count() == 4  # 2 layers x (attn_heads, mlp_out)
    page.screenshot(path=str(shots / "1-overview.png"), full_page=True)

    # search: type a regex, submit, get ranked codes per codebook
    page.click("nav >> text=Search")
    page.fill("#q", r"\bMay\b")
    page.select_option("#kind", "regex")
    page.click("#search-button")
    page.wait_for_selector("section.result")
    assert "selects" in page.inner_text("#summary")
    assert page.locator("section.result").count() == 4
    page.screenshot(path=str(shots / "2-search.png"), full_page=True)

    # a code in the results opens its page
    link = page.locator("section.result a.code-link").first
    label = link.inner_text()
    link.click()
    page.wait_for_selector("#code-title")
    assert page.inner_text("#code-title") == label
    mark = page.locator("mark.hit").first
    mark.wait_for(state="visible")
    bg = mark.evaluate("el => getComputedStyle(el).backgroundColor")
    assert bg == HIGHLIGHT, bg
    # the highlighted text is exactly the token at that position in the cache
    pos = int(mark.get_attribute("data-pos"))
    doc_href = page.locator("table.contexts a").first.get_attribute("href")
    data = page.request.get(server + "/api" + doc_href).json()
    token = next(t for t in data["tokens"] if t["pos"] == pos)
    assert mark.text_content() == token["raw"]
    page.screenshot(path=str(shots / "3-code.png"), full_page=True)

    # steer with that code: the form is prefilled, both columns come back
    page.click("#steer-link")
    page.wait_for_selector("#steer-form")
    assert page.input_value("#codes") != ""
    page.fill("#prompt", "In May the")
    page.fill("input[name=max_new_tokens]", "8")
    page.fill("input[name=num_samples]", "2")
    page.fill("input[name=scale]", "8")
    page.click("#steer-button")
    page.wait_for_selector("#steer-result")
    assert page.locator("#unsteered .gen").count() == 2
    assert page.locator("#steered .gen").count() == 2
    for gen in page.locator("#steered .gen").all():
        assert gen.inner_text().startswith("In May the")
    page.screenshot(path=str(shots / "4-steer.png"), full_page=True)
    assert not page.problems, page.problems


def test_text_page_hover_shows_codes(server: str, page: Any, shots: Path) -> None:
    page.goto(server + "/text")
    page.locator("#doc-list a").first.click()
    page.wait_for_selector("#doc-text .tok")
    tok = page.locator("#doc-text .tok").nth(3)
    tok.hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    assert "#" in tip.inner_text()
    page.screenshot(path=str(shots / "5-text-hover.png"))
    tok.click()
    detail = page.locator("#token-detail a.code-chip")
    assert detail.count() >= 1
    detail.first.click()
    page.wait_for_selector("#code-title")
    assert not page.problems, page.problems


def test_errors_render_as_pages(server: str, page: Any, shots: Path) -> None:
    resp = page.goto(server + "/code/layers.0.mlp_out/99999")
    assert resp is not None and resp.status == 404
    assert "out of range" in page.inner_text(".error-message")
    page.goto(server + "/search?q=%28unclosed")
    assert "invalid" in page.inner_text(".error-message")
    page.screenshot(path=str(shots / "6-error.png"))


def test_sae_latents_search_code_page_and_steer(
    sae_server: tuple[str, str], page: Any, shots: Path
) -> None:
    server, token = sae_server
    page.goto(server + "/")
    assert page.locator("#health tbody tr").count() == 2  # one codebook per SAE
    page.click("nav >> text=Search")
    page.fill("#q", token)
    page.select_option("#kind", "token")
    page.click("#search-button")
    page.wait_for_selector("section.result")
    assert page.locator("section.result").count() == 2
    link = page.locator(f"section.result a.code-link[href*='{SPARSIFY}/']").first
    label = link.inner_text()
    link.click()
    page.wait_for_selector("#code-title")
    assert page.inner_text("#code-title") == label
    assert float(page.inner_text("#activation-max")) > 0, "the latent's activations show"
    acts = [float(a) for a in page.locator("table.contexts td.activation").all_inner_texts()]
    assert acts and acts == sorted(acts, reverse=True)
    page.locator("#activation-histogram").wait_for(state="visible")
    page.screenshot(path=str(shots / "6-sae-code.png"), full_page=True)

    page.click("#steer-link")
    page.wait_for_selector("#steer-form")
    assert page.input_value("#codes") != ""
    page.fill("#prompt", "the market")
    page.fill("input[name=max_new_tokens]", "8")
    page.fill("input[name=num_samples]", "2")
    page.fill("input[name=scale]", "20")
    page.click("#steer-button")
    page.wait_for_selector("#steer-result")
    assert page.locator("#steered .gen").count() == 2
    plain = page.locator("#unsteered .gen").all_inner_texts()
    assert page.locator("#steered .gen").all_inner_texts() != plain, "steering changes text"
    page.screenshot(path=str(shots / "7-sae-steer.png"), full_page=True)
    assert not page.problems, page.problems
