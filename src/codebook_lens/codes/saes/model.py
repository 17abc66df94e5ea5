"""A model read by SAEs: a Hugging Face causal LM (or a ``CodebookModel``) plus dictionaries at
named sites of it, recorded in one forward pass next to the codebooks.

An SAE becomes a codebook of a cache named ``sae.<site>``: the SAELens hook name
(``sae.blocks.0.hook_mlp_out``) or, for SAEs that read a module's output (sparsify), the
module's path in the causal LM (``sae.transformer.h.0``). Its codes are each token's ``k``
strongest latents, strongest first, and its values their activations.

Folders (``load_saes``): a sparsify hookpoint folder (``cfg.json`` + ``sae.safetensors``), a
sparsify run folder holding several, or a SAELens folder (``cfg.json`` +
``sae_weights.safetensors``, what ``SAE.save_model`` / ``save_inference_model`` write).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codebook_lens.codes.saes.dictionary import Dictionary
from codebook_lens.codes.saes.saelens_adapter import SAELensDictionary, load_saelens
from codebook_lens.codes.saes.sites import as_dictionary, hook_site
from codebook_lens.codes.saes.sparsify_adapter import load_sparsify, load_sparsify_run
from codebook_lens.model.codebook_model import CodebookModel, HookSite
from codebook_lens.model.hooks import CodeRecording, measure_widths
from codebook_lens.model.layer import CodebookLayer

SAE_PREFIX = "sae."
"""Codebook names of SAEs start with this."""
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"


def dictionary_name(dictionary: Dictionary, model: nn.Module) -> str:
    """``sae.<hook name>`` for a SAELens SAE, ``sae.<module path>`` for the others."""
    site = dictionary.site(model)
    return SAE_PREFIX + (site.name if isinstance(dictionary, SAELensDictionary) else site.module)


def load_saes(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> list[Dictionary]:
    """The SAEs in ``path``: a sparsify hookpoint or run folder, or a SAELens folder. Each one
    remembers the folder it came from (``source``) so a cache can name it."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"sae={str(path)!r} is not a folder; give a sparsify hookpoint folder, a sparsify "
            "run folder (one hookpoint folder inside per SAE) or a SAELens SAE folder"
        )
    found: list[tuple[Path, Dictionary]]
    if (p / SAELENS_WEIGHTS).is_file():
        found = [(p, load_saelens(str(p), device=device))]
    elif (p / SPARSIFY_WEIGHTS).is_file():
        found = [(p, load_sparsify(p, device=device))]
    elif any((q / "cfg.json").is_file() for q in p.iterdir()):
        found = [(p / name, d) for name, d in load_sparsify_run(p, device=device).items()]
    else:
        raise FileNotFoundError(
            f"sae={str(path)!r} holds no SAE: expected {SAELENS_WEIGHTS} (SAELens), "
            f"{SPARSIFY_WEIGHTS} (a sparsify hookpoint) or hookpoint folders with cfg.json "
            "(a sparsify run)"
        )
    for folder, d in found:
        d.source = str(folder.resolve())  # type: ignore[attr-defined]
    return [d for _, d in found]


def load_cache_saes(
    codebooks: Sequence[Any], *, device: str | torch.device = "cpu"
) -> dict[str, Dictionary]:
    """The SAEs of a cache's SAE codebooks (``CodebookInfo``s), loaded from their ``source``."""
    out: dict[str, Dictionary] = {}
    for cb in codebooks:
        if cb.kind == "codebook":
            continue
        saes = load_saes(cb.source, device=device)
        if len(saes) != 1:
            raise ValueError(f"codebook {cb.name!r}: source={cb.source!r} holds {len(saes)} SAEs")
        out[cb.name] = saes[0]
    return out


class Latents:
    """Codes of every codebook and SAE recorded by ``DictionaryModel.record_codes``."""

    def __init__(self, codebooks: CodeRecording | None) -> None:
        self._codebooks = codebooks
        self._saes = CodeRecording()
        self._values = CodeRecording()

    @property
    def codes(self) -> dict[str, Tensor]:
        """``name -> (batch, seq, [heads,] k)``; SAEs: latent ids, ``-1`` where none fired."""
        own = self._codebooks.codes if self._codebooks is not None else {}
        return {**own, **self._saes.codes}

    @property
    def values(self) -> dict[str, Tensor]:
        """``SAE name -> (batch, seq, k)`` activations of the recorded latents."""
        return self._values.codes


class DictionaryModel(nn.Module):
    """A Hugging Face causal LM or ``CodebookModel`` with SAEs reading sites of it.

    ``model(...)`` runs the model unchanged (the SAEs only read); ``record_codes`` records
    the codebooks' codes and each SAE's top-k latents; ``dictionaries`` maps the SAEs' codebook
    names to them, ``k`` to the latents kept per token, ``dictionary_sites`` to their sites.

    Args:
        model: the model the SAEs were trained on.
        dictionaries: SAEs (sparsify, SAELens, ``Dictionary``) as a list (named by
            ``dictionary_name``) or by name.
        k: latents kept per token for SAEs without a fixed ``k`` (BatchTopK, JumpReLU, ...),
            one for all or by name.
    """

    inner: nn.Module
    base: nn.Module
    codebooks: dict[str, CodebookLayer]
    sites: list[HookSite]
    dictionaries: dict[str, Dictionary]
    dictionary_sites: dict[str, HookSite]
    k: dict[str, int]

    def __init__(
        self,
        model: nn.Module,
        dictionaries: Sequence[Any] | Mapping[str, Any],
        *,
        k: int | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.inner = model
        self.base = model.base if isinstance(model, CodebookModel) else model
        self.codebooks = model.codebooks if isinstance(model, CodebookModel) else {}
        self.sites = model.sites if isinstance(model, CodebookModel) else []
        named = _named(self.base, dictionaries)
        if not named:
            raise ValueError("dictionaries=[] is invalid; give at least one SAE")
        self.dictionaries = named
        self.dictionary_modules = nn.ModuleList(
            [d for d in named.values() if isinstance(d, nn.Module)]
        )
        self.dictionary_sites = {name: d.site(self.base) for name, d in named.items()}
        self.k = {
            name: _resolve_k(name, d, k.get(name) if isinstance(k, Mapping) else k)
            for name, d in named.items()
        }
        self._check_widths()

    def _check_widths(self) -> None:
        sites = list(self.dictionary_sites.values())
        measure_widths(self.base, sites)
        for (name, d), site in zip(self.dictionaries.items(), sites, strict=True):
            if site.dim != d.d_in:
                raise ValueError(
                    f"sae {name!r} reads d_in={d.d_in} activations, but its site "
                    f"{site.module!r} ({site.hook}) is {site.dim} wide in this model; give the "
                    "SAE trained on this model (allowed: d_in == the site's width)"
                )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    @contextlib.contextmanager
    def record_codes(self) -> Iterator[Latents]:
        """Record every codebook's codes and every SAE's top-k latents inside the block."""
        with contextlib.ExitStack() as stack:
            own = (
                stack.enter_context(self.inner.record_codes())
                if isinstance(self.inner, CodebookModel)
                else None
            )
            rec = Latents(own)
            for name, d in self.dictionaries.items():
                stack.enter_context(
                    hook_site(
                        self.base,
                        self.dictionary_sites[name],
                        _recorder(rec, name, d, self.k[name]),
                    )
                )
            yield rec

    @torch.no_grad()
    def get_latents(
        self, input_ids: Tensor, **kwargs: Any
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One forward pass: ``({name: codes}, {SAE name: values})``."""
        with self.record_codes() as rec:
            self(input_ids=input_ids, **kwargs)
        return rec.codes, rec.values


def _recorder(rec: Latents, name: str, d: Dictionary, k: int) -> Any:
    def record(x: Tensor) -> None:
        with torch.no_grad():
            top = d.top_k(x, k)
        rec._saes.add(name, top.indices)
        rec._values.add(name, top.values.float())

    return record


def _named(
    model: nn.Module, dictionaries: Sequence[Any] | Mapping[str, Any]
) -> dict[str, Dictionary]:
    if isinstance(dictionaries, Mapping):
        return {str(n): as_dictionary(d) for n, d in dictionaries.items()}
    out: dict[str, Dictionary] = {}
    for raw in dictionaries:
        d = as_dictionary(raw)
        name = dictionary_name(d, model)
        if name in out:
            raise ValueError(
                f"two SAEs would be named {name!r} (they read the same site); pass them by "
                "name, dictionaries={'sae.a': ..., 'sae.b': ...}"
            )
        out[name] = d
    return out


def _resolve_k(name: str, d: Dictionary, k: int | None) -> int:
    if d.k is not None:
        return d.k
    if k is None:
        raise ValueError(
            f"sae {name!r} ({d.kind}) fires a varying number of latents per token; give k "
            "(--sae-k N), the latents to keep per token"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d.num_latents:
        raise ValueError(f"k={k!r} is invalid for sae {name!r}; allowed: 1 .. {d.num_latents}")
    return k
