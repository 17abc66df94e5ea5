"""Nothing unsafe is loaded, ever: no pickle, no unsafe torch.load / np.load / yaml.load."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from codebook_lens import CodebookConfig, attach_codebooks

SRC = Path(__file__).resolve().parents[1] / "src" / "codebook_lens"

UNSAFE = {
    "pickle import": re.compile(
        r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b", re.M
    ),
    "torch.load without weights_only=True": re.compile(
        r"torch\.load\((?![^)]*weights_only\s*=\s*True)"
    ),
    "np.load with allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "yaml.load without a SafeLoader (use yaml.safe_load)": re.compile(
        r"yaml\.(unsafe_load|full_load)\(|yaml\.load\((?![^)]*Loader\s*=)"
    ),
}


def test_package_has_no_unsafe_loading() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 5
    problems = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        for what, pattern in UNSAFE.items():
            for m in pattern.finditer(text):
                line = text[: m.start()].count("\n") + 1
                problems.append(f"{f.relative_to(SRC)}:{line}: {what}")
    assert not problems, "\n".join(problems)


def test_yaml_loaders_are_safe() -> None:
    """Every ``yaml.load(..., Loader=X)`` in the package names a SafeLoader subclass."""
    import importlib

    import yaml

    for f in sorted(SRC.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"yaml\.load\([^)]*Loader\s*=\s*([\w.]+)", text):
            mod = importlib.import_module(
                "codebook_lens." + ".".join(f.relative_to(SRC).with_suffix("").parts)
            )
            name = m.group(1)
            loader = (
                getattr(yaml, name.split(".")[-1])
                if name.startswith("yaml.")
                else getattr(mod, name)
            )
            assert issubclass(loader, yaml.SafeLoader), f"{f.name}: {name} is not a SafeLoader"


def test_scanner_catches_what_it_should() -> None:
    bad = (
        "import pickle\nx = torch.load(p)\nnp.load(f, allow_pickle=True)\nyaml.load(s)\neval('1')\n"
    )
    assert not UNSAFE["yaml.load without a SafeLoader (use yaml.safe_load)"].search(
        "yaml.load(s, Loader=yaml.SafeLoader)"
    )
    hits = {what for what, pattern in UNSAFE.items() if pattern.search(bad)}
    assert hits == set(UNSAFE)
    assert not UNSAFE["torch.load without weights_only=True"].search(
        "torch.load(p, weights_only=True)"
    )


def test_same_seed_same_codes() -> None:
    from conftest import tiny_model

    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    runs = []
    for _ in range(2):
        model = attach_codebooks(tiny_model("gpt_neox"), CodebookConfig(num_codes=32, k=2, seed=7))
        runs.append(model.get_codes(ids))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    other = attach_codebooks(tiny_model("gpt_neox"), CodebookConfig(num_codes=32, k=2, seed=8))
    assert any(not torch.equal(other.get_codes(ids)[n], runs[0][n]) for n in runs[0])


def builtin_eval_calls(text: str) -> list[int]:
    """Lines that call the builtins ``eval``/``exec`` (AST-based, so prose never matches)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("eval", "exec")
    ]


def test_package_never_calls_eval_or_exec() -> None:
    problems = [
        f"{f.relative_to(SRC)}:{line}"
        for f in sorted(SRC.rglob("*.py"))
        for line in builtin_eval_calls(f.read_text(encoding="utf-8"))
    ]
    assert not problems, problems
    sample = 'x = eval("1")\nmodel.eval()\ns = "call eval() here"\n'
    assert builtin_eval_calls(sample) == [1]
