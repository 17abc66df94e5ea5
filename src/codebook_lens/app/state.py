"""What one server serves: a code cache, optionally its model, and the data of every page.

``Lens`` holds the open cache, the model and tokenizer (if given), the search pool and the
health plots, and turns the library's results (``search``, ``analysis``, ``intervene``) into
the JSON the API returns and the pages render. It computes nothing itself.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np

from codebook_lens.app.config import AppConfig, AppError
from codebook_lens.app.links import code_ref, code_url, paginate, with_query
from codebook_lens.app.parsing import Steering
from codebook_lens.app.searching import SearchPool
from codebook_lens.codes.analysis import codebook_health, plot_health
from codebook_lens.codes.cache import check_identity, load_cache
from codebook_lens.codes.intervene import cache_saes, load_model_and_tokenizer, run_with_codes
from codebook_lens.codes.search import code_profile

log = logging.getLogger("codebook_lens.app")

MAX_CODE_REFS = 100_000
"""Most (token, code) pairs one text page lists (a page of a big model's codes is heavy)."""


def open_cache(path: str) -> Any:
    """Open the cache or refuse to serve it: a cache that fails its checks raises ``ValueError``
    (or ``FileNotFoundError``) naming the file and what is wrong, before the server starts."""
    return load_cache(path)


def token_text(text: str, start: int, end: int, prev_end: int) -> dict[str, str]:
    """How a token reads in running text: the gap before it and its own characters.

    Byte-level tokenizers split one character over several tokens that all report the same
    character span; only the first shows it, so the text reads exactly once. ``raw`` is the
    token's whole span.
    """
    return {
        "gap": text[prev_end:start] if start > prev_end else "",
        "text": text[max(start, prev_end) : end],
        "raw": text[start:end],
    }


def token_rows(
    text: str,
    offsets: list[Any],
    token_ids: list[int],
    codes: list[list[dict[str, Any]]],
    *,
    first: int,
    prev_end: int,
) -> list[dict[str, Any]]:
    """The tokens of running text as JSON rows (``TokenOut``), positions from ``first``.

    ``offsets`` are each token's ``(start, end)`` characters in ``text``; ``prev_end`` is where
    the text before the first token ends.
    """
    tokens = []
    for i, ((s, e), tid) in enumerate(zip(offsets, token_ids, strict=True)):
        row = {"pos": first + i, "token_id": int(tid), **token_text(text, s, e, prev_end)}
        tokens.append({**row, "codes": codes[i]})
        prev_end = max(prev_end, e)
    return tokens


class Lens:
    """A cache, optionally its model and tokenizer, and the data of every page.

    Model forward passes (steering, pasted text, promoted tokens) run one at a time under
    ``model_lock``: interventions are installed on the model's layers, so two requests must
    never overlap. Cache queries need no lock (the cache is read-only and memory-mapped).
    """

    def __init__(
        self, config: AppConfig, *, cache: Any = None, model: Any = None, tokenizer: Any = None
    ) -> None:
        self.config = config
        self.cache = open_cache(config.cache_dir) if cache is None else cache
        if model is None and config.model_dir is not None:
            # SAE codebooks: their SAEs are loaded again from where the cache says they came
            saes, sae_k = cache_saes(self.cache)
            model, tokenizer = load_model_and_tokenizer(config.model_dir, saes=saes, sae_k=sae_k)
        if model is not None:
            check_identity(self.cache, model)
        self.model = model
        self.tokenizer = tokenizer
        self.model_lock = threading.Lock()
        self.searches = SearchPool(self.cache, config.regex_timeout, config.workers)
        self._plots_lock = threading.Lock()
        self._plots: dict[str, Path] | None = None
        self._plot_dir: tempfile.TemporaryDirectory[str] | None = None
        self._overview: dict[str, Any] | None = None

    @property
    def can_steer(self) -> bool:
        return self.model is not None

    @property
    def codebooks(self) -> list[str]:
        return list(self.cache.codebooks)

    def close(self) -> None:
        self.searches.close()
        if self._plot_dir is not None:
            self._plot_dir.cleanup()
            self._plot_dir = None

    def labels(self) -> list[str]:
        """Document labels in the cache (the topics a search can use)."""
        return self.searches.local.labels()

    def check_codebook(self, codebook: str) -> str:
        if codebook not in self.cache.codebooks:
            raise AppError(
                404, f"codebook={codebook!r} is not in this cache; choose one of {self.codebooks}"
            )
        return codebook

    # ------------------------------------------------------------- plots
    def plot(self, name: str) -> Path:
        """A health plot by name (``summary`` or a codebook); made once, kept in a temp dir."""
        names = [*self.cache.codebooks, "summary"]
        if name not in names:
            raise AppError(404, f"no plot named {name!r}; plots: {names}")
        with self._plots_lock:
            if self._plots is None:
                self._plot_dir = tempfile.TemporaryDirectory(prefix="codebook-lens-plots-")
                paths = plot_health(self.cache, self._plot_dir.name)
                self._plots = dict(zip(names, paths, strict=True))
        return self._plots[name]

    # ---------------------------------------------------------- overview
    def overview(self) -> dict[str, Any]:
        """Model, cache and per-codebook health (usage, dead codes, entropy); computed once."""
        if self._overview is None:
            self._overview = self._make_overview()
        return self._overview

    def _make_overview(self) -> dict[str, Any]:
        cache = self.cache
        m = cache.manifest
        created = m.get("created", {}) if isinstance(m.get("created"), dict) else {}
        codebooks = []
        for h in codebook_health(cache):
            info = cache.info(h.codebook)
            codebooks.append(
                {
                    **h.to_dict(),
                    "layer": info.layer,
                    "dim": info.dim,
                    "grouped": info.grouped,
                    "plot_url": f"/plots/{quote(h.codebook, safe='')}.png",
                }
            )
        return {
            "cache": {
                "name": cache.path.name,
                "n_tokens": cache.n_tokens,
                "n_docs": cache.n_docs,
                "seq_len": cache.seq_len,
                "tokenizer": str(m.get("tokenizer", "")),
                "created": created,
            },
            "model": {
                **{k: v for k, v in m.get("identity", {}).items() if k != "codebooks"},
                "loaded": self.model is not None,
            },
            "labels": self.labels(),
            "codebooks": codebooks,
            "summary_plot_url": "/plots/summary.png",
            "steer": self.can_steer,
        }

    # ------------------------------------------------------------- codes
    def check_code(self, codebook: str, code: int, head: int | None) -> int | None:
        """Validate a code address; unknown ones are 404s. Returns the head (None if ungrouped)."""
        try:
            h = self.cache.check_code(codebook, code, head)
        except ValueError as e:
            raise AppError(404, str(e)) from None
        return h if self.cache.info(codebook).grouped else None

    def token_codes(self, codebook: str | None, rows: Any) -> list[list[dict[str, Any]]]:
        """Per token, the code refs of ``codebook`` (``None`` = every codebook).

        ``rows`` maps a codebook name to its ``(n, groups, k)`` codes for the tokens shown.
        """
        names = list(rows) if codebook is None else [codebook]
        n = len(next(iter(rows.values()))) if rows else 0
        out: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for name in names:
            info = self.cache.info(name)
            arr = rows[name].tolist()
            for i in range(n):
                for h, ks in enumerate(arr[i]):
                    for c in ks:
                        if c != info.unfired:  # an SAE slot no latent filled
                            out[i].append(code_ref(name, c, h if info.grouped else None))
        return out

    def code(
        self, codebook: str, code: int, head: int | None, *, n_contexts: int, window: int
    ) -> dict[str, Any]:
        """The library's code profile, with links to documents, similar codes and steering."""
        h = self.check_code(codebook, code, head)
        kw: dict[str, Any] = {"n_contexts": n_contexts, "window": window}
        if self.model is not None:
            with self.model_lock:
                prof = code_profile(self.cache, codebook, code, h, model=self.model, **kw)
        else:
            prof = code_profile(self.cache, codebook, code, h, **kw)
        data = prof.to_dict()
        for ctx in data["contexts"]:
            ctx["doc_url"] = f"/text?doc={ctx['doc']}&pos={ctx['position']}"
        data["similar"] = [{**s, **code_ref(codebook, s["code"], h)} for s in data["similar"]]
        data["ref"] = code_ref(codebook, code, h)
        data["n_tokens"] = self.cache.n_tokens
        data["steer_url"] = "/steer?" + urlencode(
            {"codebook": codebook, "codes": code, **({} if h is None else {"head": h})}
        )
        data["more_contexts_url"] = with_query(code_url(codebook, code, h), contexts=n_contexts * 2)
        return data

    # -------------------------------------------------------------- text
    def docs_page(self, label: str | None, page: int, per_page: int) -> dict[str, Any]:
        """Documents of the cache (optionally one label), a page at a time."""
        docs = [(i, d) for i, d in enumerate(self.cache.docs) if label is None or d.label == label]
        if label is not None and not docs:
            raise AppError(404, f"label={label!r} matches no document; labels: {self.labels()}")
        p = paginate(len(docs), page, per_page)
        return {
            "label": label,
            "labels": self.labels(),
            "pagination": p,
            "docs": [
                {
                    "doc": i,
                    "id": d.id,
                    "label": d.label,
                    "tokens": d.end - d.start,
                    "preview": d.text[:120],
                    "url": f"/text?doc={i}",
                }
                for i, d in docs[p["start"] : p["stop"]]
            ],
        }

    def _codebook_or_all(self, codebook: str | None) -> str | None:
        if codebook in (None, "", "all"):
            return None
        return self.check_codebook(codebook)

    def codes_per_token(self, codebook: str | None) -> int:
        """Codes a page lists per token for ``codebook`` (``None`` = every codebook)."""
        names = self.codebooks if codebook is None else [codebook]
        return sum(self.cache.info(n).groups * self.cache.info(n).k for n in names)

    def _check_size(self, codebook: str | None, n_tokens: int) -> None:
        """Refuse pages listing more than ``MAX_CODE_REFS`` codes (big models, all codebooks)."""
        per_token = self.codes_per_token(codebook)
        if n_tokens * per_token > MAX_CODE_REFS:
            fit = max(1, MAX_CODE_REFS // per_token)
            raise ValueError(
                f"{n_tokens} tokens x {per_token} codes each is too much for one page "
                f"(at most {MAX_CODE_REFS} codes); "
                + ("choose one codebook or " if codebook is None else "")
                + f"show at most {fit} tokens per page (per_page)"
            )

    def text_doc(
        self, doc: int, codebook: str | None, page: int | None, per_page: int, pos: int | None
    ) -> dict[str, Any]:
        """Every token of one cached document (a page of it) with the codes that fire on it."""
        cache = self.cache
        if not 0 <= doc < cache.n_docs:
            raise AppError(404, f"doc={doc} is out of range; documents are 0 .. {cache.n_docs - 1}")
        d = cache.docs[doc]
        if pos is not None:
            if not d.start <= pos < d.end:
                raise AppError(
                    404, f"pos={pos} is not in document {doc} (tokens {d.start} .. {d.end - 1})"
                )
            if page is None:
                page = (pos - d.start) // per_page + 1
        p = paginate(d.end - d.start, page or 1, per_page)
        lo, hi = d.start + p["start"], d.start + p["stop"]
        cb = self._codebook_or_all(codebook)
        self._check_size(cb, hi - lo)
        names = self.codebooks if cb is None else [cb]
        rows = {name: np.asarray(cache.codes(name)[lo:hi]) for name in names}
        offsets = np.asarray(cache.offsets[lo:hi]).tolist()
        token_ids = np.asarray(cache.tokens[lo:hi]).tolist()
        prev_end = int(cache.offsets[lo - 1][1]) if lo > d.start else 0
        codes = self.token_codes(cb, rows)
        tokens = token_rows(d.text, offsets, token_ids, codes, first=lo, prev_end=prev_end)
        return {
            "source": "cache",
            "doc": doc,
            "id": d.id,
            "label": d.label,
            "codebook": cb,
            "codebooks": self.codebooks,
            "selected": pos,
            "pagination": p,
            "tokens": tokens,
        }

    def needs_model(self, what: str) -> None:
        if self.model is None or self.tokenizer is None:
            raise AppError(
                409, f"{what} needs the model and its tokenizer; start the server with --model DIR"
            )

    def text_paste(self, text: str, codebook: str | None) -> dict[str, Any]:
        """Tokenize pasted text, run the model once and show every token's codes.

        The text is cut to the model's context (the cache's sequence length) and to as many
        tokens as one page may list codes for (``truncated`` says so)."""
        self.needs_model("pasted text (or pick a cached document)")
        if not text.strip():
            raise ValueError("text is empty; paste some text")
        cb = self._codebook_or_all(codebook)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        limit = min(self.cache.seq_len or 1024, max(1, MAX_CODE_REFS // self.codes_per_token(cb)))
        ids = [int(i) for i in enc["input_ids"][:limit]]
        if not ids:
            raise ValueError("text gives no tokens")
        offsets = [tuple(o) for o in enc["offset_mapping"][: len(ids)]]
        with self.model_lock:
            result = run_with_codes(self.model, ids)
        rows = {}
        for name in self.codebooks if cb is None else [cb]:
            info = self.cache.info(name)
            rows[name] = result.codes[name][0].cpu().numpy().reshape(len(ids), info.groups, -1)
        tokens = token_rows(text, offsets, ids, self.token_codes(cb, rows), first=0, prev_end=0)
        return {
            "source": "pasted",
            "codebook": cb,
            "codebooks": self.codebooks,
            "truncated": len(enc["input_ids"]) > limit,
            "max_tokens": limit,
            "tokens": tokens,
        }

    # ------------------------------------------------------------- steer
    def steer(self, req: Steering) -> dict[str, Any]:
        """Unsteered and steered samples side by side (same prompt, same seeds)."""
        self.needs_model("steering")
        req = dataclasses.replace(req, spec=req.spec.resolved(self.cache))
        with self.model_lock:
            plain, steered = req.sample(self.model, self.tokenizer)
        return {
            "prompt": req.prompt,
            "spec": req.spec.to_dict(),
            "options": req.options(),
            "unsteered": [g._asdict() for g in plain],
            "steered": [g._asdict() for g in steered],
        }
