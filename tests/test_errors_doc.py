"""Every row of docs/errors.md is executed: the CLI must exit with the documented code and
print the documented message (and write nothing where the row says so)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest

from codebook_lens.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(
    r"^\|\s*`(?P<argv>[^`]+)`\s*\|\s*(?P<what>[^|]+?)\s*\|\s*`(?P<msg>[^`]+)`\s*\|\s*(?P<code>\d+)\s*\|$"
)


def rows() -> list[tuple[str, str, int]]:
    found = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line.strip())
        if m:
            found.append((m["argv"], m["msg"], int(m["code"])))
    return found


def test_doc_has_rows_for_every_command() -> None:
    commands = {shlex.split(argv)[0] for argv, _, _ in rows()}
    assert commands >= {
        "demo", "pretrain", "train", "eval", "cache", "search", "code", "stats", "generate",
        "serve", "experiment",
    }  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from test_cache import docs, small_model, small_tokenizer

    from codebook_lens.codes.cache import build_cache

    root = tmp_path_factory.mktemp("errors")
    tok = small_tokenizer()
    model = small_model(len(tok))
    model.save_pretrained(root / "model", tokenizer=tok)
    small_model(len(tok), seed=5).save_pretrained(root / "other", tokenizer=tok)
    build_cache(model, tok, docs(), root / "cache", seq_len=16, progress=False)
    plain = root / "plain"
    model.base.save_pretrained(plain)
    tok.save_pretrained(plain)
    shutil.copytree(root / "model", root / "corrupt")
    w = root / "corrupt" / "codebooks.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    (root / "empty").mkdir()
    (root / "badutf8").mkdir()
    (root / "badutf8" / "a.txt").write_bytes(b"caf\xe9 \xff\xfe broken bytes\n")
    (root / "text").mkdir()
    for i, t in enumerate([d.text for d in docs()]):
        (root / "text" / f"{i}.txt").write_text(t * 20)
    (root / "badspec.yaml").write_text(
        "edits:\n  - codebook: layers.0.mlp_out\n    codes: 1\n    action: boost\n"
    )
    (root / "oobspec.yaml").write_text("edits:\n  - codebook: layers.0.mlp_out\n    codes: 999\n")
    (root / "tmp").mkdir()
    return {
        "tmp": root / "tmp", "model": root / "model", "other": root / "other",
        "cache": root / "cache", "plain": plain, "corrupt": root / "corrupt",
        "empty": root / "empty", "badutf8": root / "badutf8", "text": root / "text",
        "badspec": root / "badspec.yaml", "oobspec": root / "oobspec.yaml",
        "missing": root / "does-not-exist",
    }  # fmt: skip


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors
        return int(e.code or 0)


@pytest.mark.parametrize(("argv", "message", "code"), rows(), ids=[r[0][:60] for r in rows()])
def test_documented_error(
    argv: str, message: str, code: int, files: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in shlex.split(argv)]
    before = sorted(p.name for p in files["tmp"].iterdir())
    got = run(args)
    err = capsys.readouterr().err
    assert got == code, f"exit code {got}, stderr: {err}"
    assert message in err, f"expected {message!r} in stderr: {err}"
    assert "Traceback" not in err
    # A failed command leaves nothing behind in the output folder.
    assert sorted(p.name for p in files["tmp"].iterdir()) == before
