"""SAEs as codebooks of a cache: a sparsify TopK and a SAELens BatchTopK SAE, each trained by
its own library on a tiny GPT-2, cached from the plain model, verified, counted, searched and
profiled like codes; the CLI runs the same through ``cli.main``."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_model
from helpers.saes import build_sae_cache
from test_cache import docs, small_tokenizer
from transformers import AutoModelForCausalLM

from codebook_lens.cli import main
from codebook_lens.codes.analysis import codebook_health
from codebook_lens.codes.cache import CodeCache, build_cache, check_identity, verify_cache
from codebook_lens.codes.intervene import EditSpec, InterventionSpec, generate, run_with_codes
from codebook_lens.codes.saes import DictionaryModel, load_saes
from codebook_lens.codes.search import code_profile, make_pattern, profile_html, search, search_loop

VOCAB = 320
SPARSIFY = "sae.transformer.h.0"
SAELENS = "sae.blocks.0.hook_mlp_out"
SAE_K = 64  # every latent: the slots of those that did not fire stay unfired


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plain model folder (with its tokenizer), both SAEs, and a cache of both."""
    root = tmp_path_factory.mktemp("saes")
    paths = build_sae_cache(root, sae_k=SAE_K)
    model = AutoModelForCausalLM.from_pretrained(paths["model"]).eval()
    cache = CodeCache(paths["cache"])
    return {**paths, "root": root, "tok": small_tokenizer(), "model": model, "cache": cache}


def top_latents(model: torch.nn.Module, saes: list[Any], cache: CodeCache) -> dict[str, Any]:
    """Each SAE's recorded latents over the cache's windows, run here without the cache."""
    dm = DictionaryModel(model, saes, k=SAE_K)
    codes: dict[str, list[np.ndarray]] = {n: [] for n in dm.dictionaries}
    values: dict[str, list[np.ndarray]] = {n: [] for n in dm.dictionaries}
    for s, e in cache.windows():
        got_codes, got_values = dm.get_latents(
            torch.from_numpy(np.asarray(cache.tokens[s:e], np.int64))[None]
        )
        for n in codes:
            codes[n].append(got_codes[n][0].numpy())
            values[n].append(got_values[n][0].numpy())
    return {n: (np.concatenate(codes[n]), np.concatenate(values[n])) for n in codes}


def test_saes_cached_as_codebooks(setup: dict[str, Any]) -> None:
    cache: CodeCache = setup["cache"]
    assert list(cache.codebooks) == [SPARSIFY, SAELENS]
    assert verify_cache(cache.path) == []
    sp, sl = cache.info(SPARSIFY), cache.info(SAELENS)
    assert (sp.kind, sp.k, sp.num_codes, sp.dim, sp.values) == (
        "sparsify_topk",
        4,
        64,
        32,
        "float32",
    )
    assert sp.site == {"name": "h.0", "module": "transformer.h.0", "hook": "output"}
    assert sp.source == str((setup["run"] / "h.0").resolve())
    assert (sl.kind, sl.k, sl.placement, sl.layer) == ("saelens_batchtopk", SAE_K, "mlp_out", 0)
    assert sl.site == {
        "name": "blocks.0.hook_mlp_out",
        "module": "transformer.h.0.mlp",
        "hook": "output",
    }
    assert cache.manifest["identity"]["codebooks"] == []
    assert cache.manifest["identity"]["dictionaries"] == [SPARSIFY, SAELENS]

    expected = top_latents(
        setup["model"], load_saes(setup["run"]) + load_saes(setup["lens"]), cache
    )
    for name, (ids, vals) in expected.items():
        cb = cache.info(name)
        codes = np.asarray(cache.codes(name))[:, 0]  # (n, k)
        stored = np.asarray(cache.values(name))
        assert stored.dtype == np.float32 and stored.shape == (cache.n_tokens, cb.k)
        np.testing.assert_array_equal(codes, np.where(ids < 0, cb.num_codes, ids))
        np.testing.assert_allclose(stored, vals, rtol=1e-5, atol=1e-6)
        unfired = codes == cb.num_codes
        assert np.all(stored[unfired] == 0) and np.all(stored[~unfired] != 0)
        fired = codes[~unfired]
        counts = np.bincount(fired.astype(np.int64), minlength=cb.num_codes)
        np.testing.assert_array_equal(cache.code_counts(name)[0], counts)  # unfired: never
        for latent in np.flatnonzero(counts)[:5]:
            np.testing.assert_array_equal(
                cache.positions(name, int(latent)), np.flatnonzero((codes == latent).any(1))
            )
    assert (np.asarray(cache.codes(SAELENS)) == 64).any(), "BatchTopK leaves slots unfired"
    health = {h.codebook: h for h in codebook_health(cache)}
    assert health[SPARSIFY].used_codes + health[SPARSIFY].dead_codes == 64


def best_latent(cache: CodeCache, name: str) -> tuple[int, str]:
    """The latent that fires most often on one token, and that token's text."""
    best = (0.0, 0, "")
    for latent in np.flatnonzero(cache.code_counts(name)[0] >= 3):
        toks = np.asarray(cache.tokens)[cache.positions(name, int(latent))]
        ids, counts = np.unique(toks, return_counts=True)
        share = counts.max() / len(toks)
        if share > best[0]:
            best = (float(share), int(latent), cache.token_str(int(ids[counts.argmax()])))
    return best[1], best[2]


@pytest.mark.parametrize("name", [SPARSIFY, SAELENS])
def test_search_finds_the_latent_of_a_token(setup: dict[str, Any], name: str) -> None:
    cache: CodeCache = setup["cache"]
    latent, token = best_latent(cache, name)
    pattern = make_pattern(cache, token=token)
    result = search(cache, pattern, codebooks=[name], top=None)
    by_code = {m.code: m for m in result.matches}
    assert latent in by_code and all(m.code < 64 for m in result.matches)
    brute = {c: hits for _, c, hits in search_loop(cache, pattern, name)}
    assert {c: m.hits for c, m in by_code.items()} == {c: h for c, h in brute.items() if c < 64}
    assert by_code[latent].precision == max(m.precision for m in result.matches if m.count >= 3)


def test_code_profile_of_a_latent_shows_activations(setup: dict[str, Any]) -> None:
    cache: CodeCache = setup["cache"]
    latent, _ = best_latent(cache, SPARSIFY)
    prof = code_profile(cache, SPARSIFY, latent)
    values = np.asarray(cache.values(SPARSIFY))[:, :][
        np.asarray(cache.codes(SPARSIFY))[:, 0] == latent
    ]
    assert prof.activations is not None
    assert prof.activations.max == pytest.approx(float(values.max()))
    assert prof.activations.mean == pytest.approx(float(values.mean()), rel=1e-5)
    assert sum(prof.activations.histogram) == prof.count
    acts = [c.activation for c in prof.contexts]
    assert all(a is not None and a > 0 for a in acts)
    assert acts == sorted(acts, reverse=True), "strongest activations first"
    assert acts[0] == pytest.approx(prof.activations.max)
    assert len(prof.similar) > 0, "similar latents by decoder direction"
    page = profile_html(prof)
    assert f"max {prof.activations.max:.3g}" in page and f"({acts[0]:.3g})" in page
    assert page.count("</td><td>") >= len(prof.activations.histogram)  # the histogram rows


def test_other_sae_weights_are_refused(setup: dict[str, Any]) -> None:
    cache: CodeCache = setup["cache"]
    saes = load_saes(setup["run"]) + load_saes(setup["lens"])
    check_identity(cache, DictionaryModel(setup["model"], saes, k=SAE_K))
    with torch.no_grad():
        saes[0].W_dec.add_(0.01)
    with pytest.raises(ValueError, match="dictionary_hash"):
        check_identity(cache, DictionaryModel(setup["model"], saes, k=SAE_K))


def test_bad_saes_are_named(setup: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sae='.*nowhere' is not a folder"):
        load_saes(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no SAE"):
        load_saes(tmp_path)
    (sae,) = load_saes(setup["run"] / "h.0")
    with pytest.raises(
        ValueError, match=r"module 'model.h.0' \(for 'h.0'\) is not in the model; nearby"
    ):
        DictionaryModel(tiny_model("llama", vocab=VOCAB), [sae])
    wide = tiny_model("gpt2", vocab=VOCAB, width=48)
    with pytest.raises(ValueError, match="d_in=32.*48 wide"):
        DictionaryModel(wide, [sae])
    (lens,) = load_saes(setup["lens"])
    with pytest.raises(ValueError, match="--sae-k"):
        DictionaryModel(setup["model"], [lens])
    with pytest.raises(ValueError, match="without codebooks"):
        build_cache(setup["model"], setup["tok"], docs(), tmp_path / "c", progress=False)


def test_cli_caches_searches_and_profiles_saes(
    setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = setup["root"]
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(d.text for d in docs()))
    out = tmp_path / "cache"
    args = ["cache", str(root / "model"), "--data", str(data), "--out", str(out)]
    assert (
        main(
            [*args, "--sae", str(setup["run"]), "--sae", str(setup["lens"]), "--sae-k", str(SAE_K)]
        )
        == 0
    )
    assert "2 codebooks" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert main(["stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [s["codebook"] for s in stats] == [SPARSIFY, SAELENS]
    cache = CodeCache(out)
    latent, token = best_latent(cache, SPARSIFY)
    assert (
        main(
            ["search", str(out), "--token", token, "--codebook", SPARSIFY, "--json", "--top", "64"]
        )
        == 0
    )
    found = json.loads(capsys.readouterr().out)
    assert latent in [m["code"] for m in found]
    assert main(["code", str(out), SPARSIFY, str(latent), "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["activations"]["max"] > 0 and prof["contexts"][0]["activation"] > 0
    assert main(["code", str(out), SPARSIFY, str(latent), "--color", "never"]) == 0
    assert "activation" in capsys.readouterr().out
    assert main([*args, "--overwrite", "--sae", str(tmp_path / "missing")]) == 2
    assert "missing' is not a folder" in capsys.readouterr().err
    shutil.rmtree(out)


def steering_setup(setup: dict[str, Any]) -> tuple[DictionaryModel, int, torch.Tensor]:
    cache: CodeCache = setup["cache"]
    dm = DictionaryModel(
        setup["model"], load_saes(setup["run"]) + load_saes(setup["lens"]), k=SAE_K
    )
    latent, _ = best_latent(cache, SPARSIFY)
    ids = torch.from_numpy(np.asarray(cache.tokens[:12], dtype=np.int64))[None]
    return dm, latent, ids


@pytest.mark.parametrize("name", [SPARSIFY, SAELENS])
def test_forcing_and_banning_a_latent_then_leaving_is_bit_identical(
    setup: dict[str, Any], name: str
) -> None:
    cache: CodeCache = setup["cache"]
    dm, _, ids = steering_setup(setup)
    latent = int(np.argmax(cache.code_counts(name)[0]))
    with torch.no_grad():
        before = dm(input_ids=ids).logits
    force = InterventionSpec([EditSpec(name, latent, positions=[-1])]).resolved(cache)
    peak = float(
        np.asarray(cache.values(name))[np.asarray(cache.codes(name))[:, 0] == latent].max()
    )
    assert force.edits[0].value == pytest.approx(peak)
    forced = run_with_codes(dm, ids, force)
    assert not torch.allclose(forced.logits[:, -1], before[:, -1])
    assert torch.equal(forced.logits[:, :-1], before[:, :-1]), "only the edited position changes"
    assert latent in forced.codes[name][0, -1].tolist(), "the forced latent is read back"
    fires = [p for p in range(ids.shape[1]) if latent in run_with_codes(dm, ids).codes[name][0, p]]
    ban = InterventionSpec([EditSpec(name, latent, positions=fires, action="ban")])
    banned = run_with_codes(dm, ids, ban)
    assert not torch.allclose(banned.logits[:, fires[0]], before[:, fires[0]])
    with torch.no_grad():
        assert torch.equal(dm(input_ids=ids).logits, before), "bit-identical after the block"
    with pytest.raises(ValueError, match="value=None is invalid"):
        run_with_codes(dm, ids, InterventionSpec([EditSpec(name, latent)]))
    with pytest.raises(ValueError, match="not latents of SAE"):
        run_with_codes(dm, ids, InterventionSpec([EditSpec(name, 64, value=1.0)]))


def test_steering_a_latent_changes_generation(
    setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dm, latent, ids = steering_setup(setup)
    prompt = ids[0, :6].tolist()
    plain = generate(dm, None, prompt, max_new_tokens=8, temperature=0)
    spec = InterventionSpec([EditSpec(SPARSIFY, latent, positions="generated", scale=20.0)])
    steered = generate(
        dm, None, prompt, spec.resolved(setup["cache"]), max_new_tokens=8, temperature=0
    )
    assert steered[0].ids != plain[0].ids
    assert generate(dm, None, prompt, max_new_tokens=8, temperature=0) == plain

    spec.save(tmp_path / "steer.yaml")
    root: Path = setup["root"]
    args = ["generate", str(root / "model"), "the market", "--n", "1", "--temperature", "0"]
    args += ["--max-new-tokens", "8", "--json", "--intervene", str(tmp_path / "steer.yaml")]
    assert main([*args, "--sae", str(setup["run"]), "--cache", str(setup["cache"].path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steered"][0]["ids"] != out["unsteered"][0]["ids"]
    assert main([*args, "--sae", str(setup["run"])]) == 2
    assert "value=None is invalid" in capsys.readouterr().err


def test_readme_sae_section_runs_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's section: its Python block, then each of its shell commands via cli.main
    (``serve`` is run as a server by the browser test)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your SAEs in codebook-lens", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (shell,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md[saes]", "exec"), {})  # noqa: S102
    commands = [
        shlex.split(line, comments=True) for line in shell.replace("\\\n", " ").splitlines()
    ]
    commands = [c for c in commands if c]
    assert [c[1] for c in commands][-1] == "serve"
    for argv in commands[:-1]:
        assert argv[0] == "codebook-lens"
        assert main(argv[1:]) == 0, (argv, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "activation" in out and "sae.transformer.h.0" in out
