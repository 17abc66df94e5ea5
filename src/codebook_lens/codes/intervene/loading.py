"""Loading a saved model with its tokenizer, comparing steered samples, and prompts typed on
the command line."""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from codebook_lens.codes.intervene.generation import Generation, generate
from codebook_lens.codes.intervene.spec import InterventionSpec
from codebook_lens.codes.saes.model import DictionaryModel, load_saes
from codebook_lens.model.codebook_model import CONFIG_NAME, CodebookModel, foreign_formats


def load_model_and_tokenizer(
    path: str | os.PathLike[str],
    *,
    device: str | None = None,
    saes: Sequence[str | os.PathLike[str]] | None = None,
    sae_k: int | Mapping[str, int] | None = None,
) -> tuple[CodebookModel | DictionaryModel, Any]:
    """A saved codebook model and its tokenizer (``None`` if none was saved with it).

    With ``saes`` (folders for ``codes.saes.load_saes``) the model reads those SAEs too (a
    ``DictionaryModel``, ``sae_k`` latents per token for SAEs without a fixed k), and ``path``
    may be a plain Hugging Face causal LM folder (or hub id) without codebooks.
    """
    from transformers import AutoTokenizer

    model: CodebookModel | DictionaryModel
    if saes and not _is_codebook_model(path):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(path))
        base = base.to(device) if device is not None else base  # type: ignore[arg-type]
        model = DictionaryModel(base, _load_all(saes, device), k=sae_k)
    else:
        model = CodebookModel.from_pretrained(path, device=device)
        if saes:
            model = DictionaryModel(model, _load_all(saes, device), k=sae_k)
    model.eval()
    local = Path(path)
    if local.is_dir() and not any(
        (local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return model, None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def cache_saes(cache: Any) -> tuple[list[str], dict[str, int]]:
    """The folders of a cache's SAE codebooks and the latents each keeps per token, for
    ``load_model_and_tokenizer(path, saes=..., sae_k=...)`` (``[]`` for a codebook cache)."""
    infos = [cb for cb in cache.codebooks.values() if cb.is_sae]
    return [cb.source for cb in infos], {cb.name: cb.k for cb in infos}


def _is_codebook_model(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a codebook model (ours or a converted format), not a plain LM."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return True
    return any(f.detect(path, local_files_only=True) for f in foreign_formats())


def _load_all(paths: Sequence[str | os.PathLike[str]], device: str | None) -> list[Any]:
    return [d for path in paths for d in load_saes(path, device=device or "cpu")]


def compare(
    model: CodebookModel,
    tokenizer: Any,
    prompt: str | Sequence[int],
    spec: InterventionSpec | None,
    *,
    num_samples: int = 5,
    **sampling: Any,
) -> tuple[list[Generation], list[Generation]]:
    """Unsteered and steered samples from the same prompt and seed (paired draws)."""
    plain = generate(model, tokenizer, prompt, None, num_samples=num_samples, **sampling)
    steered = (
        generate(model, tokenizer, prompt, spec, num_samples=num_samples, **sampling)
        if spec is not None and len(spec)
        else []
    )
    return plain, steered


def _show(g: Generation) -> str:
    return g.text if g.text is not None else " ".join(map(str, g.ids))


def format_side_by_side(
    prompt: str, plain: list[Generation], steered: list[Generation], width: int = 100
) -> str:
    """Samples as two wrapped columns (unsteered | steered), or one column without a spec."""
    lines = [f"prompt: {prompt!r}"]
    if not steered:
        lines.append("unsteered (no --intervene spec given):")
        for i, g in enumerate(plain, 1):
            body = textwrap.wrap(_show(g).replace("\n", " "), max(width - 5, 20)) or [""]
            lines += [f"{i:>3}  {body[0]}"] + [f"     {b}" for b in body[1:]]
        return "\n".join(lines)
    col = max((width - 8) // 2, 20)
    lines.append(f"{'':>3}  {'unsteered':<{col}} | steered")
    lines.append(f"{'':>3}  {'-' * col}-+-{'-' * col}")
    for i, (a, b) in enumerate(zip(plain, steered, strict=True), 1):
        left = textwrap.wrap(_show(a).replace("\n", " "), col) or [""]
        right = textwrap.wrap(_show(b).replace("\n", " "), col) or [""]
        for j in range(max(len(left), len(right))):
            num = f"{i:>3}" if j == 0 else "   "
            lt = left[j] if j < len(left) else ""
            rt = right[j] if j < len(right) else ""
            lines.append(f"{num}  {lt:<{col}} | {rt}")
    return "\n".join(lines)


def parse_prompt(tokenizer: Any, prompt: str) -> str | list[int]:
    """Text for a model with a tokenizer; without one, whitespace-separated token ids."""
    if tokenizer is not None:
        return prompt
    parts = prompt.split()
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(
            f"prompt={prompt!r} is invalid: the model has no saved tokenizer, so give token ids "
            "separated by spaces (e.g. '0 12 7'), or save the model with "
            "save_pretrained(dir, tokenizer=...)"
        )
    return [int(p) for p in parts]
