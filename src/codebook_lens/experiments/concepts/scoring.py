"""Scoring a battery on a code cache: per concept the best code, the best neuron at the same
site, the best k-means control code and the best precise code; and their summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from codebook_lens.codes.analysis import NeuronResult, best_neurons
from codebook_lens.codes.search import CodeMatch
from codebook_lens.experiments.concepts.battery import Concept


@dataclass
class NeuronMatch(NeuronResult):
    """The best thresholded neuron of one site for a concept."""

    site: str = ""
    """The codebook whose input the neuron belongs to."""


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
    of ``codes`` ``(N, groups, k)``; one bincount in bounded chunks. Ids ``>= num_codes`` (an
    SAE's slot where no latent fired) count for nothing."""
    n, g, k = codes.shape
    offs = (np.arange(g, dtype=np.int64) * num_codes)[None, :, None]
    out = np.zeros(g * num_codes, dtype=np.int64)
    total = n if rows is None else len(rows)
    step = max(1, (1 << 22) // max(1, g * k))
    for s in range(0, total, step):
        part = codes[s : s + step] if rows is None else codes[rows[s : s + step]]
        ids = part.astype(np.int64)
        fired = ids < num_codes
        out += np.bincount((ids + offs)[fired], minlength=g * num_codes)
    return out.reshape(g, num_codes)


def _match(
    codebook: str, grouped: bool, flat: int, num_codes: int, hits: int, count: int, n_pos: int
) -> CodeMatch:
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
    names = [c.name for c in concepts]
    pos = {n: np.asarray(positions[n], dtype=np.int64) for n in names}
    pos = {n: p[p < n_tokens] for n, p in pos.items()}
    if any(len(p) == 0 for p in pos.values()):
        empty = [n for n, p in pos.items() if len(p) == 0]
        raise ValueError(f"concepts {empty} occur on none of the {n_tokens} evaluated tokens")
    per_site = {
        site: _trained_codes(site, sc, pos, n_tokens, min_precision, min_count)
        for site, sc in trained.items()
    }
    ctrl = {site: _control_codes(site, sc, pos, n_tokens) for site, sc in (control or {}).items()}
    neurons = {
        site: _site_neurons(site, acts, pos, n_tokens) for site, acts in (activations or {}).items()
    }
    return [_concept_result(c, len(pos[c.name]), per_site, ctrl, neurons) for c in concepts]


def _trained_codes(
    site: str,
    sc: SiteCodes,
    pos: Mapping[str, np.ndarray],
    n_tokens: int,
    min_precision: float,
    min_count: int,
) -> dict[str, tuple[CodeMatch | None, CodeMatch | None]]:
    """Concept name -> (best code by F1, precise code) of one trained site."""
    if sc.codes.shape[0] < n_tokens:
        raise ValueError(f"site {site!r}: codes for {sc.codes.shape[0]} < {n_tokens} tokens")
    codes = sc.codes[:n_tokens]
    counts = code_counts(codes, sc.num_codes)
    found = {}
    for n, p in pos.items():
        hits = code_counts(codes, sc.num_codes, p)
        found[n] = (
            best_code(site, sc.grouped, hits, counts, len(p)),
            precise_code(
                site,
                sc.grouped,
                hits,
                counts,
                len(p),
                min_precision=min_precision,
                min_count=min_count,
            ),
        )
    return found


def _control_codes(
    site: str, sc: SiteCodes, pos: Mapping[str, np.ndarray], n_tokens: int
) -> dict[str, CodeMatch | None]:
    """Concept name -> best code by F1 of one control site."""
    codes = sc.codes[:n_tokens]
    counts = code_counts(codes, sc.num_codes)
    return {
        n: best_code(site, sc.grouped, code_counts(codes, sc.num_codes, p), counts, len(p))
        for n, p in pos.items()
    }


def _site_neurons(
    site: str, acts: np.ndarray, pos: Mapping[str, np.ndarray], n_tokens: int
) -> dict[str, NeuronMatch]:
    """Concept name -> best thresholded neuron of one site's activations."""
    if acts.shape[0] < n_tokens:
        raise ValueError(f"site {site!r}: activations for {acts.shape[0]} < {n_tokens} tokens")
    labels = []
    for p in pos.values():
        lab = np.zeros(n_tokens, dtype=bool)
        lab[p] = True
        labels.append(lab)
    found = best_neurons(np.asarray(acts[:n_tokens]), labels)
    return {n: _neuron(site, r) for n, r in zip(pos, found, strict=True)}


def _concept_result(
    concept: Concept,
    tokens: int,
    per_site: Mapping[str, Mapping[str, tuple[CodeMatch | None, CodeMatch | None]]],
    ctrl: Mapping[str, Mapping[str, CodeMatch | None]],
    neurons: Mapping[str, Mapping[str, NeuronMatch]],
) -> ConceptResult:
    """One concept's best units over the sites (``per_site`` in the order of the trained
    sites; ties go to the earlier site); neuron and control are taken at the best code's site."""
    n = concept.name
    code: CodeMatch | None = None
    precise: CodeMatch | None = None
    for site in per_site:
        c, p = per_site[site][n]
        if _better(c, code):
            code = c
        if _better(p, precise, "hits"):
            precise = p
    at = code.codebook if code is not None else next(iter(per_site), None)
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
    return ConceptResult(
        name=n,
        kind=concept.kind,
        query=concept.query_text(),
        description=concept.description,
        tokens=tokens,
        code=code,
        neuron=neuron,
        control=control_code,
        precise=precise,
        neuron_any_site=neuron_any,
        control_any_site=control_any,
    )


def _neuron(site: str, r: NeuronResult) -> NeuronMatch:
    return NeuronMatch(**dataclasses.asdict(r), site=site)


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
