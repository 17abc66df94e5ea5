"""Concept battery (METHOD.md section 3): are codes cleaner units than neurons, over many concepts?

For each concept of a battery (a YAML file: regexes over the text, tokens, token sets,
document labels), on the same evaluated tokens of a code cache:

- **code**: the best single code of any codebook by F1 (precision = fraction of the code's
  firings on concept tokens, recall = fraction of concept tokens where it fires);
- **neuron**: at the same site (the codebook's input, before quantization), the best single
  activation dimension with its best threshold, either sign (``analysis.best_neurons``, the
  neuron baseline of ``analysis.neuron_baseline``);
- **control**: k-means on the BASE model's activations at the same site (same number of codes
  and k, the same similarity, the top-k nearest centroids per token and head), then its best
  code: what training with the bottleneck adds over clustering a model that never had one;
- **precise code**: among codes with precision >= 0.9 (and a few firings), the one with the
  best recall, the paper's notion of a clean feature.

``score_concepts`` does the scoring on arrays (tests plant codes and neurons in a synthetic
cache); ``run_concepts`` is the command: model, cache and base model (trained the way
``experiment topics`` trains them, or reused), the battery, ``report.md`` / ``report.html`` and
``metrics.json``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from codebook_lens.config import check_range, write_json_atomic

if TYPE_CHECKING:
    from torch import nn

    from codebook_lens.codes.analysis import NeuronResult
    from codebook_lens.codes.cache import CodeCache
    from codebook_lens.codes.search import CodeMatch

ConceptKind = Literal["regex", "token", "tokens", "docs"]
CONCEPT_KINDS: tuple[str, ...] = ("regex", "token", "tokens", "docs")


# ---------------------------------------------------------------- battery
@dataclass
class Concept:
    """One named pattern of a battery."""

    name: str
    kind: ConceptKind
    """'regex', 'token', 'tokens' (a set of token strings) or 'docs' (a document label)."""
    query: str | list[str]
    description: str = ""

    def query_text(self) -> str:
        return ", ".join(self.query) if isinstance(self.query, list) else self.query


def builtin_battery_path() -> Path:
    """The battery shipped with the package (``experiments/data/concepts.yaml``)."""
    return Path(str(resources.files("codebook_lens.experiments") / "data" / "concepts.yaml"))


def load_battery(path: str | Path | None = None) -> list[Concept]:
    """Read a concept battery (``None`` = the built-in one); errors name the file and entry."""
    import yaml

    src = builtin_battery_path() if path is None else Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"concepts={str(src)!r}: no such battery file (a YAML file)")
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"concepts={str(src)!r}: not valid YAML ({err})") from None
    entries = data.get("concepts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"concepts={str(src)!r}: expected a non-empty list under 'concepts:' "
            "(each entry: name plus one of regex, token, tokens, docs)"
        )
    out: list[Concept] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        where = f"concepts={str(src)!r}, entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected a mapping with 'name' and a pattern, got {e!r}")
        name = e.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        where = f"concepts={str(src)!r}, concept {name!r}"
        if name in seen:
            raise ValueError(f"{where}: the name is used twice; names must be unique")
        seen.add(name)
        unknown = sorted(set(e) - {"name", "description", *CONCEPT_KINDS})
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; allowed: name, description, regex, token, "
                "tokens, docs"
            )
        kinds = [k for k in CONCEPT_KINDS if k in e]
        if len(kinds) != 1:
            raise ValueError(
                f"{where}: give exactly one of regex, token, tokens, docs (got {kinds or 'none'})"
            )
        kind = kinds[0]
        q = e[kind]
        if kind == "tokens":
            if not isinstance(q, list) or not q or not all(isinstance(t, str) and t for t in q):
                raise ValueError(f"{where}: 'tokens' must be a non-empty list of strings")
            query: str | list[str] = [str(t) for t in q]
        else:
            if isinstance(q, int | float) and not isinstance(q, bool) and kind != "regex":
                q = str(q)  # YAML reads `token: 2004` as a number
            if not isinstance(q, str) or not q:
                raise ValueError(f"{where}: {kind!r} must be a non-empty string, got {q!r}")
            query = q
        desc = e.get("description", "")
        out.append(Concept(name, kind, query, str(desc or "")))  # type: ignore[arg-type]
    return out


def concept_positions(cache: CodeCache, concept: Concept, *, timeout: float = 10.0) -> np.ndarray:
    """Sorted token positions of ``concept`` in ``cache`` (empty if it never occurs there).

    ``ValueError`` for an invalid regex (or one that times out); a document label absent from
    the cache gives no positions (the concept is then skipped, not an error).
    """
    from codebook_lens.codes.search import docs_pattern, regex_pattern, token_pattern

    if concept.kind == "regex":
        assert isinstance(concept.query, str)
        try:
            return regex_pattern(cache, concept.query, timeout=timeout).positions
        except ValueError as e:
            raise ValueError(f"concept {concept.name!r}: {e}") from None
    if concept.kind == "token":
        assert isinstance(concept.query, str)
        return token_pattern(cache, concept.query).positions
    if concept.kind == "tokens":
        parts = [token_pattern(cache, t).positions for t in concept.query]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    assert isinstance(concept.query, str)
    if concept.query not in {d.label for d in cache.docs}:
        return np.zeros(0, dtype=np.int64)
    return docs_pattern(cache, concept.query).positions


# ----------------------------------------------------------------- scoring
@dataclass
class NeuronMatch:
    """The best thresholded neuron of one site for a concept."""

    site: str
    """The codebook whose input the neuron belongs to."""
    neuron: int
    sign: int
    """+1: fires when activation >= threshold; -1: when <= threshold."""
    threshold: float
    precision: float
    recall: float
    f1: float
    count: int
    hits: int


@dataclass
class ConceptResult:
    """Code, neuron and control for one concept, on the same evaluated tokens."""

    name: str
    kind: str
    query: str
    description: str
    tokens: int
    """Concept tokens among the evaluated ones."""
    code: CodeMatch | None
    """Best code by F1 over every codebook."""
    neuron: NeuronMatch | None
    """Best neuron at the code's site."""
    control: CodeMatch | None
    """Best k-means control code at the code's site."""
    precise: CodeMatch | None
    """The code with the best recall among those with precision >= the threshold."""
    neuron_any_site: NeuronMatch | None = None
    """Best neuron over every site (a stricter baseline)."""
    control_any_site: CodeMatch | None = None
    """Best control code over every site."""
    contexts: list[str] = field(default_factory=list)
    """Where the best code fires (``[[token]]`` marks the firing token)."""

    @property
    def code_f1(self) -> float:
        return self.code.f1 if self.code is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def code_counts(codes: np.ndarray, num_codes: int, rows: np.ndarray | None = None) -> np.ndarray:
    """``(groups, num_codes)`` tokens on which each code fires, over ``rows`` (default all)
    of ``codes`` ``(N, groups, k)``; one bincount in bounded chunks."""
    n, g, k = codes.shape
    offs = (np.arange(g, dtype=np.int64) * num_codes)[None, :, None]
    out = np.zeros(g * num_codes, dtype=np.int64)
    total = n if rows is None else len(rows)
    step = max(1, (1 << 22) // max(1, g * k))
    for s in range(0, total, step):
        part = codes[s : s + step] if rows is None else codes[rows[s : s + step]]
        out += np.bincount((part.astype(np.int64) + offs).ravel(), minlength=g * num_codes)
    return out.reshape(g, num_codes)


def _match(
    codebook: str, grouped: bool, flat: int, num_codes: int, hits: int, count: int, n_pos: int
) -> CodeMatch:
    from codebook_lens.codes.search import CodeMatch

    return CodeMatch(
        codebook=codebook,
        code=flat % num_codes,
        head=flat // num_codes if grouped else None,
        precision=hits / count,
        recall=hits / n_pos,
        f1=2 * hits / (count + n_pos),
        count=count,
        hits=hits,
    )


def best_code(
    codebook: str, grouped: bool, hits: np.ndarray, counts: np.ndarray, n_pos: int
) -> CodeMatch | None:
    """The code with the best F1 (ties: the lowest head, then code id); ``None`` if none hits."""
    h, c = hits.ravel(), counts.ravel()
    f1 = 2 * h / np.maximum(c + n_pos, 1)
    i = int(np.argmax(f1))
    if h[i] == 0:
        return None
    return _match(codebook, grouped, i, hits.shape[1], int(h[i]), int(c[i]), n_pos)


def precise_code(
    codebook: str,
    grouped: bool,
    hits: np.ndarray,
    counts: np.ndarray,
    n_pos: int,
    *,
    min_precision: float,
    min_count: int,
) -> CodeMatch | None:
    """Among codes with precision >= ``min_precision`` firing on >= ``min_count`` tokens, the one
    with the most hits (= best recall); ``None`` if there is none."""
    h, c = hits.ravel(), counts.ravel()
    ok = (c >= max(1, min_count)) & (h >= min_precision * c) & (h > 0)
    if not ok.any():
        return None
    score = np.where(ok, h, -1)
    i = int(np.argmax(score))
    return _match(codebook, grouped, i, hits.shape[1], int(h[i]), int(c[i]), n_pos)


def _better(a: Any, b: Any, key: str = "f1") -> bool:
    """Is ``a`` strictly better than ``b`` (``None`` is worst)?"""
    if a is None:
        return False
    return b is None or getattr(a, key) > getattr(b, key)


@dataclass
class SiteCodes:
    """One site's codes on the evaluated tokens: ``codes`` ``(N, groups, k)``."""

    codes: np.ndarray
    num_codes: int
    grouped: bool


def score_concepts(
    concepts: Sequence[Concept],
    positions: Mapping[str, np.ndarray],
    n_tokens: int,
    trained: Mapping[str, SiteCodes],
    *,
    activations: Mapping[str, np.ndarray] | None = None,
    control: Mapping[str, SiteCodes] | None = None,
    min_precision: float = 0.9,
    min_count: int = 5,
) -> list[ConceptResult]:
    """Score every concept on the first ``n_tokens`` tokens.

    ``positions``: concept name -> sorted token positions (those >= ``n_tokens`` are ignored);
    ``trained`` / ``control``: site (codebook name) -> codes on the ``n_tokens`` tokens;
    ``activations``: site -> ``(n_tokens, D)`` inputs of that codebook for the neuron baseline.
    Sites are visited in the order of ``trained``; ties go to the earlier site.
    """
    from codebook_lens.codes.analysis import best_neurons

    names = [c.name for c in concepts]
    pos = {n: np.asarray(positions[n], dtype=np.int64) for n in names}
    pos = {n: p[p < n_tokens] for n, p in pos.items()}
    if any(len(p) == 0 for p in pos.values()):
        empty = [n for n, p in pos.items() if len(p) == 0]
        raise ValueError(f"concepts {empty} occur on none of the {n_tokens} evaluated tokens")
    per_site: dict[str, dict[str, tuple[CodeMatch | None, CodeMatch | None]]] = {}
    for site, sc in trained.items():
        if sc.codes.shape[0] < n_tokens:
            raise ValueError(f"site {site!r}: codes for {sc.codes.shape[0]} < {n_tokens} tokens")
        codes = sc.codes[:n_tokens]
        counts = code_counts(codes, sc.num_codes)
        per_site[site] = {}
        for n in names:
            hits = code_counts(codes, sc.num_codes, pos[n])
            per_site[site][n] = (
                best_code(site, sc.grouped, hits, counts, len(pos[n])),
                precise_code(
                    site,
                    sc.grouped,
                    hits,
                    counts,
                    len(pos[n]),
                    min_precision=min_precision,
                    min_count=min_count,
                ),
            )
    ctrl: dict[str, dict[str, CodeMatch | None]] = {}
    for site, sc in (control or {}).items():
        codes = sc.codes[:n_tokens]
        counts = code_counts(codes, sc.num_codes)
        ctrl[site] = {
            n: best_code(
                site, sc.grouped, code_counts(codes, sc.num_codes, pos[n]), counts, len(pos[n])
            )
            for n in names
        }
    neurons: dict[str, dict[str, NeuronMatch]] = {}
    for site, acts in (activations or {}).items():
        if acts.shape[0] < n_tokens:
            raise ValueError(f"site {site!r}: activations for {acts.shape[0]} < {n_tokens} tokens")
        labels = []
        for n in names:
            lab = np.zeros(n_tokens, dtype=bool)
            lab[pos[n]] = True
            labels.append(lab)
        found = best_neurons(np.asarray(acts[:n_tokens]), labels)
        neurons[site] = {n: _neuron(site, r) for n, r in zip(names, found, strict=True)}

    out = []
    for concept in concepts:
        n = concept.name
        code: CodeMatch | None = None
        precise: CodeMatch | None = None
        for site in trained:
            c, p = per_site[site][n]
            if _better(c, code):
                code = c
            if _better(p, precise, "hits"):
                precise = p
        at = code.codebook if code is not None else next(iter(trained), None)
        neuron = neurons.get(at, {}).get(n) if at is not None else None
        control_code = ctrl.get(at, {}).get(n) if at is not None else None
        neuron_any = None
        for s in neurons:
            if _better(neurons[s][n], neuron_any):
                neuron_any = neurons[s][n]
        control_any = None
        for s in ctrl:
            if _better(ctrl[s][n], control_any):
                control_any = ctrl[s][n]
        out.append(
            ConceptResult(
                name=n,
                kind=concept.kind,
                query=concept.query_text(),
                description=concept.description,
                tokens=len(pos[n]),
                code=code,
                neuron=neuron,
                control=control_code,
                precise=precise,
                neuron_any_site=neuron_any,
                control_any_site=control_any,
            )
        )
    return out


def _neuron(site: str, r: NeuronResult) -> NeuronMatch:
    return NeuronMatch(
        site, r.neuron, r.sign, r.threshold, r.precision, r.recall, r.f1, r.count, r.hits
    )


def summarize(
    results: Sequence[ConceptResult],
    *,
    min_precision: float = 0.9,
    min_recall: float = 0.3,
) -> dict[str, Any]:
    """The fractions the targets are stated in (strict wins; a missing unit scores 0)."""
    n = len(results)

    def f1(x: Any) -> float:
        return float(x.f1) if x is not None else 0.0

    beats_neuron = [r.name for r in results if r.neuron is not None and r.code_f1 > f1(r.neuron)]
    beats_any = [
        r.name
        for r in results
        if r.neuron_any_site is not None and r.code_f1 > f1(r.neuron_any_site)
    ]
    beats_control = [r.name for r in results if r.control is not None and r.code_f1 > f1(r.control)]
    precise = [r.name for r in results if r.precise is not None and r.precise.recall >= min_recall]
    with_neuron = sum(r.neuron is not None for r in results)
    with_control = sum(r.control is not None for r in results)
    frac_n = len(beats_neuron) / with_neuron if with_neuron else None
    frac_c = len(beats_control) / with_control if with_control else None
    return {
        "concepts": n,
        "code_beats_neuron": frac_n,
        "code_beats_neuron_concepts": beats_neuron,
        "code_beats_neuron_any_site": len(beats_any) / with_neuron if with_neuron else None,
        "code_beats_control": frac_c,
        "code_beats_control_concepts": beats_control,
        "precise_concepts": len(precise),
        "precise_concept_names": precise,
        "precise_definition": f"a code with precision >= {min_precision} and recall >= {min_recall}",
        "targets": {
            "code_beats_neuron": {"target": 0.8, "met": frac_n is not None and frac_n >= 0.8},
            "precise_concepts": {"target": 10, "met": len(precise) >= 10},
            "code_beats_control": {"target": 0.7, "met": frac_c is not None and frac_c >= 0.7},
        },
    }


def format_summary(metrics: Mapping[str, Any]) -> str:
    """A terminal table of every concept plus the three target lines."""
    rows = [f"{'concept':<28}{'tokens':>7}{'code F1':>9}{'neuron F1':>10}{'k-means F1':>11}"]
    for name, m in metrics["concepts"].items():

        def f1(unit: Any) -> str:
            return "-" if unit is None else f"{unit['f1']:.3f}"

        rows.append(
            f"{name[:27]:<28}{m['tokens']:>7}{f1(m['code']):>9}{f1(m['neuron']):>10}"
            f"{f1(m['control']):>11}"
        )
    s = metrics["summary"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0%}"

    rows += [
        f"code beats neuron: {pct(s['code_beats_neuron'])} of {s['concepts']} concepts "
        "(target >= 80%)",
        f"concepts with {s['precise_definition']}: {s['precise_concepts']} (target >= 10)",
        f"code beats k-means control: {pct(s['code_beats_control'])} (target >= 70%)",
    ]
    return "\n".join(rows)


# --------------------------------------------------------- activations
def module_activations(
    model: nn.Module,
    cache: CodeCache,
    module: str,
    hook: Literal["input", "output"],
    *,
    max_tokens: int,
    batch_size: int = 8,
) -> np.ndarray:
    """The input (or output) of ``model``'s ``module`` on the cache's first ``max_tokens``
    tokens, run in the same windows as the cache build -> ``(n, width)`` float32.

    For a model without codebooks (the base model of the k-means control); a codebook model's
    own sites go through ``analysis.site_activations``.
    """
    import torch

    from codebook_lens.model.codebook_model import eval_mode

    mods = dict(model.named_modules())
    if module not in mods:
        raise ValueError(f"module={module!r} is not a module of the base model")
    n = min(max_tokens, cache.n_tokens)
    tokens = np.asarray(cache.tokens)
    got: list[torch.Tensor] = []

    def grab_in(mod: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach())

    def grab_out(mod: nn.Module, args: Any, out: Any) -> None:
        got.append((out[0] if isinstance(out, tuple) else out).detach())

    handle = (
        mods[module].register_forward_pre_hook(grab_in)
        if hook == "input"
        else mods[module].register_forward_hook(grab_out)
    )
    device = next(model.parameters()).device
    out: np.ndarray | None = None
    windows = list(cache.windows(n))
    try:
        with eval_mode(model), torch.no_grad():
            for b in range(0, len(windows), batch_size):
                batch = windows[b : b + batch_size]
                width = max(e - s for s, e in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, (s, e) in enumerate(batch):
                    ids[i, : e - s] = torch.from_numpy(tokens[s:e].astype(np.int64))
                    mask[i, : e - s] = 1
                got.clear()
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                x = got[0].float().cpu().numpy()
                if out is None:
                    out = np.zeros((n, x.shape[-1]), dtype=np.float32)
                for i, (s, e) in enumerate(batch):
                    out[s:e] = x[i, : e - s]
    finally:
        handle.remove()
    assert out is not None, "the cache has no tokens"
    return out


def kmeans_codes(
    acts: np.ndarray,
    *,
    num_codes: int,
    k: int,
    groups: int,
    similarity: str = "cosine",
    layer_norm: bool = False,
    fit_tokens: int = 100_000,
    iters: int = 20,
    seed: int = 0,
) -> np.ndarray:
    """The k-means control: ``num_codes`` centroids per group fitted (Lloyd, the layer's
    similarity) on ``fit_tokens`` random rows of ``acts`` ``(N, D)``, then each token's top-k
    centroids by that similarity -> ``(N, groups, k)`` ids, exactly as a ``CodebookLayer``
    initialised by k-means and never trained would choose them."""
    import torch
    import torch.nn.functional as F

    from codebook_lens.model.layer import CodebookLayer

    n, d = acts.shape
    layer = CodebookLayer(
        d, num_codes, k, groups=groups, similarity=similarity, grouped=True, kmeans_iters=iters
    )
    x = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)).reshape(n, groups, -1)
    if layer_norm:  # the layer normalises each slice before scoring
        x = F.layer_norm(x, (x.shape[-1],))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(fit_tokens, n), replace=False))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer.init_kmeans(x[torch.from_numpy(rows)])
    layer.eval()
    return layer.search(x).numpy().astype(np.uint16 if num_codes <= 65_536 else np.uint32)


# ---------------------------------------------------------------- config
@dataclass
class ConceptsConfig:
    """The concept battery (``codebook-lens experiment concepts``)."""

    out: str = "runs/concepts"
    """Output folder: report.md, report.html, metrics.json, plots (and the model when trained)."""

    topics_run: str | None = None
    """A finished `experiment topics` folder: its model/, base/ and cache/ are reused."""

    model: str | None = None
    """A saved codebook model (with tokenizer); overrides topics_run's model."""

    cache: str | None = None
    """A code cache of that model; None = topics_run's cache, or one built into OUT/cache."""

    base: str | None = None
    """The base model (no codebooks) for the k-means control; None = topics_run's base/, else
    the codebook model with its codebooks switched off."""

    concepts: str | None = None
    """The concept battery, a YAML file (None = the built-in battery of 40+ concepts)."""

    data: str = "bbc"
    """Corpus for training (when nothing is reused) or for a new cache."""

    max_tokens: int = 200_000
    """Evaluate on the cache's first this many tokens (code, neuron and control alike)."""

    min_tokens: int = 10
    """Skip concepts occurring on fewer evaluated tokens than this."""

    min_precision: float = 0.9
    """Precision of a 'precise' code (the feature criterion)."""

    min_recall: float = 0.3
    """Recall a precise code needs to count for the target."""

    min_count: int = 5
    """A precise code must fire on at least this many tokens."""

    kmeans_tokens: int = 100_000
    """Tokens the k-means control is fitted on (random, seeded)."""

    kmeans_iters: int = 20
    """Lloyd iterations of the k-means control."""

    contexts: int = 6
    """Contexts shown per concept."""

    regex_timeout: float = 10.0
    """Seconds each concept regex may run over the cache."""

    quick: bool = False
    """A toy model and few tokens: end to end in seconds (tests, smoke runs)."""

    seed: int = 0
    """Seed of training (when nothing is reused) and of the k-means control."""

    device: str = "cpu"
    """'cpu' or 'cuda'."""

    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "min_tokens", "min_count", "kmeans_tokens", "contexts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid; it must be an integer >= 1")
        if isinstance(self.kmeans_iters, bool) or not isinstance(self.kmeans_iters, int):
            raise ValueError(
                f"kmeans_iters={self.kmeans_iters!r} is invalid; it must be an integer"
            )
        check_range("kmeans_iters", self.kmeans_iters, 0)
        check_range("min_precision", self.min_precision, 0.0, 1.0, low_open=True)
        check_range("min_recall", self.min_recall, 0.0, 1.0)
        check_range("regex_timeout", self.regex_timeout, 0.0, low_open=True)
        if self.cache is not None and self.model is None and self.topics_run is None:
            raise ValueError(
                f"cache={self.cache!r} needs the model it was built with: give model= (--model)"
            )
        if self.quick:
            self.max_tokens = min(self.max_tokens, 6_000)
            self.kmeans_tokens = min(self.kmeans_tokens, 6_000)
            self.kmeans_iters = min(self.kmeans_iters, 5)
            self.min_tokens = min(self.min_tokens, 3)


# ------------------------------------------------------------- experiment
@dataclass
class Prepared:
    model: Any
    cache: CodeCache
    base: nn.Module | None
    model_source: str
    base_source: str


def prepare(cfg: ConceptsConfig, out: Path) -> Prepared:
    """The codebook model, its cache and the base model: reused, or trained like
    ``experiment topics`` (same sizes, same splits) into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codebook_lens.codes.cache import build_cache, check_identity, load_cache
    from codebook_lens.experiments.topics import (
        TopicsConfig,
        interleave,
        prepare_model_and_cache,
        split_corpus,
    )
    from codebook_lens.model.codebook_model import CodebookModel
    from codebook_lens.training.data import load_documents

    run = Path(cfg.topics_run) if cfg.topics_run is not None else None
    if run is not None and not (run / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"topics_run={str(run)!r}: no model/ in it (run `codebook-lens experiment topics "
            f"--out {run}` first)"
        )
    model_dir = cfg.model or (str(run / "model") if run is not None else None)
    if model_dir is None:
        tcfg = TopicsConfig(
            out=str(out), data=cfg.data, quick=cfg.quick, seed=cfg.seed, device=cfg.device
        )
        tcfg.progress = cfg.progress
        splits = split_corpus(tcfg)
        out.mkdir(parents=True, exist_ok=True)
        model, _, trained_base, source, cache = prepare_model_and_cache(tcfg, splits.lm, out)
        return Prepared(model, cache, trained_base, source, str(out / "base"))
    model = CodebookModel.from_pretrained(model_dir, device=cfg.device).eval()
    cache_dir = cfg.cache or (str(run / "cache") if run is not None and cfg.model is None else None)
    if cache_dir is not None:
        cache = load_cache(cache_dir)
        check_identity(cache, model)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception:
            raise FileNotFoundError(
                f"model={model_dir!r}: no tokenizer saved with it; save the model with "
                "save_pretrained(dir, tokenizer=...)"
            ) from None
        docs = interleave(load_documents(cfg.data))
        cache = build_cache(
            model,
            tokenizer,
            docs,
            out / "cache",
            max_tokens=cfg.max_tokens,
            overwrite=True,
            progress=cfg.progress,
            source=cfg.data,
        )
    base_dir = cfg.base or (
        str(run / "base") if run is not None and (run / "base").is_dir() else None
    )
    base: nn.Module | None = None
    base_source = "the codebook model with its codebooks switched off (no base model given)"
    if base_dir is not None:
        if not Path(base_dir).is_dir():
            raise FileNotFoundError(f"base={base_dir!r}: no such model folder")
        loaded: Any = AutoModelForCausalLM.from_pretrained(base_dir)
        base = loaded.to(cfg.device).eval()
        base_source = base_dir
    return Prepared(model, cache, base, model_dir, base_source)


def run_concepts(cfg: ConceptsConfig) -> dict[str, Any]:
    """Run the battery; writes report.md/report.html/metrics.json, returns the metrics."""
    from tqdm.auto import tqdm

    from codebook_lens.codes.analysis import site_activations
    from codebook_lens.codes.search import code_contexts

    started = time.perf_counter()
    out = Path(cfg.out)
    battery = load_battery(cfg.concepts)  # bad battery: fail before any work
    prep = prepare(cfg, out)  # bad model / cache / base: fail before writing anything
    out.mkdir(parents=True, exist_ok=True)
    model, cache = prep.model, prep.cache
    n = min(cfg.max_tokens, cache.n_tokens)

    positions: dict[str, np.ndarray] = {}
    skipped: list[dict[str, Any]] = []
    for c in battery:
        p = concept_positions(cache, c, timeout=cfg.regex_timeout)
        m = int((p < n).sum())
        if m < cfg.min_tokens:
            why = (
                f"document label {c.query!r} not in the cache"
                if c.kind == "docs" and m == 0
                else f"occurs on {m} of the {n} evaluated tokens (< min_tokens={cfg.min_tokens})"
            )
            skipped.append({"name": c.name, "reason": why})
            continue
        positions[c.name] = p
    concepts = [c for c in battery if c.name in positions]
    if not concepts:
        raise ValueError(
            f"no concept of the battery occurs on >= min_tokens={cfg.min_tokens} of the {n} "
            "evaluated tokens; lower --min-tokens or use more tokens"
        )

    sites = [s for s in model.sites if s.name in cache.codebooks]
    trained: dict[str, SiteCodes] = {}
    acts: dict[str, np.ndarray] = {}
    control: dict[str, SiteCodes] = {}
    bar = tqdm(sites, desc="sites", disable=not cfg.progress)
    for site in bar:
        info = cache.info(site.name)
        layer = model.codebooks[site.name]
        trained[site.name] = SiteCodes(
            np.asarray(cache.codes(site.name)[:n]), info.num_codes, info.grouped
        )
        acts[site.name] = site_activations(model, cache, site.name, max_tokens=n)
        if prep.base is not None:
            base_acts = module_activations(prep.base, cache, site.module, site.hook, max_tokens=n)
        else:
            with model.disabled():
                base_acts = module_activations(
                    model.base, cache, site.module, site.hook, max_tokens=n
                )
        ctrl_codes = kmeans_codes(
            base_acts,
            num_codes=layer.num_codes,
            k=layer.k,
            groups=layer.groups,
            similarity=layer.similarity,
            layer_norm=layer.layer_norm,
            fit_tokens=cfg.kmeans_tokens,
            iters=cfg.kmeans_iters,
            seed=cfg.seed,
        )
        del base_acts
        control[site.name] = SiteCodes(ctrl_codes, layer.num_codes, info.grouped)
    bar.close()

    results = score_concepts(
        concepts,
        positions,
        n,
        trained,
        activations=acts,
        control=control,
        min_precision=cfg.min_precision,
        min_count=cfg.min_count,
    )
    for r in results:
        if r.code is not None:
            ctx = code_contexts(
                cache, r.code.codebook, r.code.code, r.code.head, n=cfg.contexts, window=40
            )
            r.contexts = [x.render() for x in ctx]
    summary = summarize(results, min_precision=cfg.min_precision, min_recall=cfg.min_recall)
    metrics: dict[str, Any] = {
        "model": prep.model_source,
        "base": prep.base_source,
        "cache": str(cache.path),
        "n_tokens": n,
        "battery": str(cfg.concepts or builtin_battery_path()),
        "codebooks": [
            {"name": s.name, "placement": s.placement, "groups": s.groups, "dim": s.dim}
            for s in sites
        ],
        "summary": summary,
        "concepts": {r.name: r.to_dict() for r in results},
        "skipped": skipped,
        "config": asdict(cfg),
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_concepts_report(cfg, metrics, results, out)
    return metrics


# ----------------------------------------------------------------- report
def _unit(x: Any) -> str:
    if x is None:
        return "-"
    if hasattr(x, "neuron"):
        return f"{x.site} n{x.neuron}{'+' if x.sign > 0 else '-'}"
    head = "" if x.head is None else f" h{x.head}"
    return f"{x.codebook}{head} #{x.code}"


def _pr(x: Any) -> str:
    return "-" if x is None else f"{x.precision:.2f} / {x.recall:.2f}"


def _f1(x: Any) -> str:
    return "-" if x is None else f"{x.f1:.3f}"


def write_concepts_report(
    cfg: ConceptsConfig, metrics: dict[str, Any], results: Sequence[ConceptResult], out: Path
) -> Path:
    """report.md + report.html + concepts_scatter.png + concepts_precise.png."""
    import matplotlib.pyplot as plt

    from codebook_lens.report import Report

    s = metrics["summary"]
    rep = Report("Concept battery: codes against neurons and a k-means control")
    rep.paragraph(
        f"Model: {metrics['model']}; code cache {metrics['cache']}, first {metrics['n_tokens']:,} "
        f"tokens evaluated; battery {metrics['battery']} ({s['concepts']} concepts scored, "
        f"{len(metrics['skipped'])} skipped). Code = the best single code over every codebook by "
        "F1 (precision: the code's firings on concept tokens; recall: concept tokens where it "
        "fires). Neuron = the best single dimension of the same codebook's input (before "
        "quantization) with its best threshold, either sign. Control = k-means "
        f"({cfg.kmeans_iters} Lloyd iterations on {cfg.kmeans_tokens:,} tokens, same number of "
        f"codes, same k and similarity, top-k nearest centroids) of the base model's activations "
        f"at the same site; base: {metrics['base']}. Precise code = the best-recall code with "
        f"precision >= {cfg.min_precision} firing >= {cfg.min_count} times."
    )

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0%}"

    t = s["targets"]
    rep.table(
        [
            {
                "claim": "best code beats the best neuron at its site (F1)",
                "measured": pct(s["code_beats_neuron"]),
                "target": ">= 80%",
                "met": t["code_beats_neuron"]["met"],
            },
            {
                "claim": f"concepts with {s['precise_definition']}",
                "measured": s["precise_concepts"],
                "target": ">= 10",
                "met": t["precise_concepts"]["met"],
            },
            {
                "claim": "trained code beats the k-means control at its site (F1)",
                "measured": pct(s["code_beats_control"]),
                "target": ">= 70%",
                "met": t["code_beats_control"]["met"],
            },
            {
                "claim": "best code beats the best neuron of any site (stricter, no target)",
                "measured": pct(s["code_beats_neuron_any_site"]),
                "target": "",
                "met": "",
            },
        ],
        caption="Targets",
    )
    rows = []
    for r in results:
        rows.append(
            {
                "concept": r.name,
                "tokens": r.tokens,
                "best code": _unit(r.code),
                "code P / R": _pr(r.code),
                "code F1": _f1(r.code),
                "neuron": _unit(r.neuron),
                "neuron P / R": _pr(r.neuron),
                "neuron F1": _f1(r.neuron),
                "k-means F1": _f1(r.control),
                "precise code P / R": _pr(r.precise),
            }
        )
    rep.table(rows, caption="Every concept (same tokens for code, neuron and control)")

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, key, label in (
        (axes[0], "neuron", "best neuron F1 (same site)"),
        (axes[1], "control", "k-means control F1 (same site)"),
    ):
        xs = [getattr(r, key).f1 if getattr(r, key) is not None else 0.0 for r in results]
        ys = [r.code_f1 for r in results]
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="equal F1")
        ax.scatter(xs, ys, s=22, color="C0" if key == "neuron" else "C2", zorder=3)
        for x, y, r in zip(xs, ys, results, strict=True):
            ax.annotate(r.name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=label, ylabel="best code F1", aspect="equal")
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_title("code vs neuron")
    axes[1].set_title("trained code vs k-means control")
    rep.figure(
        fig,
        "concepts_scatter",
        caption="One point per concept; above the diagonal the code is the better detector",
    )
    precise = sorted(
        (r for r in results if r.precise is not None),
        key=lambda r: -(r.precise.recall),  # type: ignore[union-attr]
    )
    if precise:
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(precise) + 1.2))
        ax.barh([r.name for r in precise], [r.precise.recall for r in precise])  # type: ignore[union-attr]
        ax.axvline(cfg.min_recall, color="C3", ls="--", lw=1, label=f"recall {cfg.min_recall}")
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel=f"recall of the best code with precision >= {cfg.min_precision}")
        ax.legend(fontsize=8)
        rep.figure(
            fig,
            "concepts_precise",
            caption=f"Concepts with a code of precision >= {cfg.min_precision} "
            f"({len(precise)} of {len(results)}), by that code's recall",
        )
    else:
        rep.paragraph(f"No concept has a code with precision >= {cfg.min_precision}.")
    if metrics["skipped"]:
        rep.paragraph(
            "Skipped: " + "; ".join(f"{x['name']} ({x['reason']})" for x in metrics["skipped"])
        )
    rep.heading("Top contexts of each concept's best code")
    for r in results:
        rep.heading(f"{r.name}: {_unit(r.code)} (F1 {_f1(r.code)})", level=3)
        rep.paragraph(
            f"Pattern ({r.kind}): {r.query}" + (f" — {r.description}" if r.description else "")
        )
        rep.code("\n".join(r.contexts) if r.contexts else "(the code never fires)")
    rep.paragraph(f"Run time: {metrics['seconds']:.0f} s. Full results in metrics.json.")
    return rep.write(out)
