"""Interventions: force / ban codes, positions during generation, restore, spec round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from codebook_lens import CodebookConfig, attach_codebooks
from codebook_lens.codes.intervene import (
    EditSpec,
    InterventionSpec,
    Positions,
    ablate,
    generate,
    intervene,
    run_with_codes,
)

IDS = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))
PLACES = ["attn_heads", "mlp_out"]


def make(arch: str = "gpt2", k: int = 2, num_codes: int = 16):
    return attach_codebooks(
        tiny_model(arch), CodebookConfig(num_codes=num_codes, k=k, placements=PLACES)
    )


def spec(*edits: EditSpec) -> InterventionSpec:
    return InterventionSpec(list(edits))


def rarest(codes: torch.Tensor, num_codes: int) -> int:
    """A code id that is chosen nowhere in ``codes`` (so forcing it is a visible change)."""
    used = set(codes.reshape(-1).tolist())
    return next(c for c in range(num_codes) if c not in used)


# ----------------------------------------------------------------- force / ban
def test_force_everywhere_puts_code_at_every_position(arch: str) -> None:
    model = make(arch)
    base = model.get_codes(IDS)
    x = rarest(base["layers.1.mlp_out"], 16)
    out = run_with_codes(model, IDS, spec(EditSpec("layers.1.mlp_out", x)))
    codes = out.codes["layers.1.mlp_out"]
    assert codes.shape == (2, 10, 2)
    assert (codes == x).any(-1).all()
    # replace-lowest keeps the token's best remaining code in slot 0.
    assert (codes[..., 1] == x).all()
    assert not torch.equal(out.logits, model(input_ids=IDS).logits)


def test_force_on_one_head_only() -> None:
    model = make()
    base = model.get_codes(IDS)["layers.0.attn_heads"]  # (2, 10, 4, 2)
    x = rarest(base[:, :, 2], 16)
    codes = run_with_codes(model, IDS, spec(EditSpec("layers.0.attn_heads", x, head=2))).codes[
        "layers.0.attn_heads"
    ]
    assert (codes[:, :, 2] == x).any(-1).all()
    # Other heads of the same layer see unchanged inputs, so their codes are unchanged.
    for h in (0, 1, 3):
        assert torch.equal(codes[:, :, h], base[:, :, h])


def test_ban_means_code_never_appears(arch: str) -> None:
    model = make(arch)
    base = model.get_codes(IDS)["layers.0.mlp_out"]
    x = int(base[..., 0].flatten().mode().values)  # the most used top code
    codes = run_with_codes(model, IDS, spec(EditSpec("layers.0.mlp_out", x, action="ban"))).codes
    assert not (codes["layers.0.mlp_out"] == x).any()
    assert codes["layers.0.mlp_out"].shape == base.shape


def test_ban_chooses_next_best_code() -> None:
    model = make(k=1)
    base = model.get_codes(IDS)["layers.0.mlp_out"][..., 0]  # (2, 10)
    layer = model.codebooks["layers.0.mlp_out"]
    x = int(base[0, 0])
    # The next best code computed directly from the layer's own top-2 search at layer 0.
    seen = {}
    mlp = dict(model.base.named_modules())[model.sites[1].module]
    h = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("raw", o), prepend=True)
    model.get_codes(IDS)
    h.remove()
    top2 = layer.search(seen["raw"].reshape(-1, 1, layer.dim), k=2).reshape(2, 10, 2)
    out = run_with_codes(model, IDS, spec(EditSpec("layers.0.mlp_out", x, action="ban")))
    got = out.codes["layers.0.mlp_out"][..., 0]
    expected = torch.where(top2[..., 0] == x, top2[..., 1], top2[..., 0])
    assert torch.equal(got, expected)


def test_append_adds_a_slot_with_scale() -> None:
    model = make()
    x = 5
    s = spec(EditSpec("layers.0.mlp_out", x, slot="append", scale=2.0, positions=[3]))
    out = run_with_codes(model, IDS, s)
    codes = out.codes["layers.0.mlp_out"]
    assert codes.shape == (2, 10, 3)
    assert (codes[:, 3, 2] == x).all()
    assert not (codes[:, 3, :2] == x).any()
    # Elsewhere the extra slot repeats the lowest code (weight 0), never the forced one.
    others = [p for p in range(10) if p != 3]
    assert torch.equal(codes[:, others, 2], codes[:, others, 1])
    # Positions before 3 are untouched (causal model): identical logits there.
    ref = model(input_ids=IDS).logits
    assert torch.equal(out.logits[:, :3], ref[:, :3])
    assert not torch.equal(out.logits[:, 3], ref[:, 3])


def test_scale_zero_replace_is_like_dropping_a_code() -> None:
    model = make(k=2)
    layer = model.codebooks["layers.0.mlp_out"]
    seen = {}
    mlp = dict(model.base.named_modules())[model.sites[1].module]
    h = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("q", o))
    out = run_with_codes(model, IDS, spec(EditSpec("layers.0.mlp_out", 7, scale=0.0)))
    h.remove()
    codes = out.codes["layers.0.mlp_out"]
    # Output = the one remaining best code (the forced code has weight 0).
    torch.testing.assert_close(seen["q"], layer.codebook[0][codes[..., 0]])


def test_slice_and_list_positions() -> None:
    model = make()
    x = rarest(model.get_codes(IDS)["layers.0.mlp_out"], 16)
    for positions, chosen in (
        ("3:7", [3, 4, 5, 6]),
        ("-2", [8]),
        ([0, 9], [0, 9]),
        ("::4", [0, 4, 8]),
        ("-3:", [7, 8, 9]),
    ):
        s = spec(EditSpec("layers.0.mlp_out", x, positions=positions))
        hit = (run_with_codes(model, IDS, s).codes["layers.0.mlp_out"] == x).any(-1)
        expected = torch.zeros(10, dtype=torch.bool)
        expected[chosen] = True
        assert torch.equal(hit, expected.expand(2, 10)), positions


# ------------------------------------------------------------------ restore
def test_empty_spec_and_restore_are_bit_identical(arch: str) -> None:
    model = make(arch)
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    assert torch.equal(run_with_codes(model, IDS, InterventionSpec()).logits, ref)
    assert torch.equal(run_with_codes(model, IDS, None).logits, ref)
    run_with_codes(model, IDS, spec(EditSpec("layers.0.attn_heads", [1, 2], positions="all")))
    with (
        pytest.raises(RuntimeError, match="boom"),
        intervene(model, spec(EditSpec("layers.0.mlp_out", 3, action="ban"))),
    ):
        raise RuntimeError("boom")
    assert all(layer.edit is None for layer in model.codebooks.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref)


def test_nested_intervention_on_same_codebook_is_refused() -> None:
    model = make()
    s = spec(EditSpec("layers.0.mlp_out", 3))
    with intervene(model, s), pytest.raises(ValueError, match="already active"):
        run_with_codes(model, IDS, s)


# ---------------------------------------------------------------- generation
def test_generated_positions_only_affect_new_tokens() -> None:
    model = make(k=1)
    prompt = IDS[0, :5]
    with model.record_codes() as rec0:
        plain = generate(model, None, prompt, max_new_tokens=6, temperature=0, stop_at_eos=False)
    base_codes = rec0["layers.1.mlp_out"]  # (1, 5 + 5, 1)
    x = rarest(base_codes, 16)
    s = spec(EditSpec("layers.1.mlp_out", x, positions="generated"))
    with model.record_codes() as rec:
        steered = generate(
            model, None, prompt, s, max_new_tokens=6, temperature=0, stop_at_eos=False
        )
    codes = rec["layers.1.mlp_out"]
    assert codes.shape == (1, 10, 1)
    assert torch.equal(codes[:, :5], base_codes[:, :5])  # prompt untouched
    assert (codes[:, 5:] == x).all()  # every fed-back generated token forced
    # The first new token is predicted from the prompt alone: unchanged.
    assert steered[0].ids[0] == plain[0].ids[0]
    assert len(steered[0].ids) == 6


def test_generate_with_cache_matches_full_forward() -> None:
    """Positions under the KV cache resolve like in one full forward pass."""
    model = make()
    prompt = IDS[0, :4]
    s = spec(EditSpec("layers.0.attn_heads", [3], positions="5:", head=1))
    with model.record_codes() as rec:
        out = generate(model, None, prompt, s, max_new_tokens=5, temperature=0, stop_at_eos=False)
    ids = out[0].ids
    full = torch.cat([prompt, torch.tensor(ids[:-1])])  # every token the loop fed in
    res = run_with_codes(model, full, s, prompt_length=4)
    assert res.logits[0, 3:].argmax(-1).tolist() == ids
    for name, codes in res.codes.items():
        assert torch.equal(codes, rec[name]), name
    assert (res.codes["layers.0.attn_heads"][0, 5:, 1] == 3).any(-1).all()
    assert not (res.codes["layers.0.attn_heads"][0, :5, 1] == 3).any(-1).all()


def test_hf_generate_inside_intervene_tracks_positions() -> None:
    model = make(k=1)
    prompt = IDS[:1, :4]
    x = 9
    s = spec(EditSpec("layers.0.mlp_out", x, positions="generated"))
    with intervene(model, s), model.record_codes() as rec:
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, min_new_tokens=4)
    codes = rec["layers.0.mlp_out"][0, :, 0]
    assert codes.shape == (7,)
    assert (codes[4:] == x).all()
    assert torch.equal(codes[:4], model.get_codes(prompt)["layers.0.mlp_out"][0, :, 0])


def test_sampling_is_seeded_and_paired() -> None:
    model = make()
    a = generate(model, None, [1, 2, 3], max_new_tokens=8, num_samples=3, seed=4, stop_at_eos=False)
    b = generate(model, None, [1, 2, 3], max_new_tokens=8, num_samples=3, seed=4, stop_at_eos=False)
    assert a == b and len(a) == 3 and all(len(g.ids) == 8 for g in a)
    assert len({tuple(g.ids) for g in a}) > 1
    top1 = generate(model, None, [1, 2, 3], max_new_tokens=8, top_k=1, stop_at_eos=False)
    greedy = generate(model, None, [1, 2, 3], max_new_tokens=8, temperature=0, stop_at_eos=False)
    assert top1 == greedy


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-8, 0.3, 0.999999, 1.0])
@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6, 0.7, 50.0])
def test_sampling_never_runs_out_of_candidates(top_p: float, temperature: float) -> None:
    model = make()
    kw = {"max_new_tokens": 5, "num_samples": 3, "stop_at_eos": False, "seed": 2}
    gens = generate(model, None, [1, 2, 3], top_p=top_p, temperature=temperature, **kw)
    assert len(gens) == 3 and all(len(g.ids) == 5 for g in gens)
    if top_p <= 1e-8 or temperature <= 1e-40:
        # Only the most likely token is left: sampling is greedy decoding.
        greedy = generate(model, None, [1, 2, 3], temperature=0, **kw)
        assert gens == greedy, (top_p, temperature)


def test_generation_stops_at_eos() -> None:
    model = make()
    gens = generate(model, None, [1, 2], max_new_tokens=30, num_samples=4, seed=1)
    assert all(0 not in g.ids for g in gens)  # eos_token_id=0 in the tiny models


# ------------------------------------------------------------------- ablate
def test_ablate_measures_loss_change_on_chosen_tokens() -> None:
    model = make()
    base = model.get_codes(IDS)["layers.0.mlp_out"]
    x = int(base[..., 0].flatten().mode().values)
    mask = torch.zeros_like(IDS, dtype=torch.bool)
    mask[:, 5:] = True
    s = spec(EditSpec("layers.0.mlp_out", x, action="ban"))
    res = ablate(model, IDS, s, mask)
    assert res.tokens == 10
    assert res.delta == pytest.approx(res.loss_after - res.loss_before)
    assert res.delta != 0
    assert torch.isnan(res.token_delta[:, :5]).all()
    assert res.token_delta[:, 5:].mean().item() == pytest.approx(res.delta, abs=1e-5)
    assert ablate(model, IDS, InterventionSpec(), mask).delta == 0.0


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (EditSpec("layers.0.mlp_out", 16), r"codes=\[16\] are not in codebook.*num_codes=16"),
        (EditSpec("layers.9.mlp_out", 1), r"not a codebook of this model; known codebooks: \["),
        (EditSpec("layers.0.attn_heads", 1, head=4), r"head=4 is out of range.*4 heads"),
        (EditSpec("layers.0.mlp_out", 1, head=0), r"not per-head"),
        (EditSpec("layers.0.mlp_out", 1, positions=10), r"position 10 is past the sequence"),
        (EditSpec("layers.0.mlp_out", 1, positions=-11), r"position -11 is before the start"),
        (EditSpec("layers.0.mlp_out", 1, positions="12:"), r"selects no position"),
        (EditSpec("layers.0.mlp_out", [1, 2, 3]), r"exceeds its k=2 slots"),
    ],
)
def test_model_errors(edit: EditSpec, match: str) -> None:
    model = make()
    with pytest.raises(ValueError, match=match):
        run_with_codes(model, IDS, spec(edit))
    assert all(layer.edit is None for layer in model.codebooks.values())


def test_generation_position_past_the_end() -> None:
    model = make()
    s = spec(EditSpec("layers.0.mlp_out", 1, positions=[8]))
    with pytest.raises(ValueError, match=r"position 8 is past the sequence.*0 \.\. 7"):
        generate(model, None, [1, 2, 3], s, max_new_tokens=6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"codes": -1}, r"codes=-1 is invalid"),
        ({"codes": []}, r"codes=\[\] is invalid"),
        ({"codes": [1, 1]}, r"listed twice"),
        ({"positions": "first"}, r"positions='first' is invalid; choose 'all', 'prompt'"),
        ({"positions": "1:2:0"}, r"step must be >= 1"),
        ({"positions": True}, r"positions=True is invalid"),
        ({"action": "boost"}, r"action='boost' is invalid; choose 'force' or 'ban'"),
        ({"slot": "first"}, r"slot='first' is invalid; choose 'replace-lowest' or 'append'"),
        ({"scale": float("inf")}, r"scale=inf is invalid"),
        ({"head": -1}, r"head=-1 is invalid"),
    ],
)
def test_spec_errors(kwargs: dict, match: str) -> None:
    args = {"codebook": "layers.0.mlp_out", "codes": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        EditSpec(**args)


def test_spec_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml: intervention spec file not found"):
        InterventionSpec.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("edits:\n  - codebook: layers.0.mlp_out\n    code: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: edits\[0\]: unknown field\(s\) \['code'\]"):
        InterventionSpec.load(bad)
    bad.write_text("edits:\n  - codebook: layers.0.mlp_out\n    codes: three\n")
    with pytest.raises(ValueError, match=r"field 'codes' has value 'three'"):
        InterventionSpec.load(bad)
    bad.write_text("edits: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        InterventionSpec.load(bad)


# --------------------------------------------------------------- round trips
def test_spec_round_trips_yaml_and_json(tmp_path: Path) -> None:
    s = spec(
        EditSpec("layers.0.attn_heads", [1, 2], positions="3:10", head=1, scale=0.5),
        EditSpec("layers.1.mlp_out", 4, positions=[0, -1], action="ban"),
        EditSpec("layers.1.mlp_out", 7, positions="generated", slot="append"),
    )
    assert InterventionSpec.from_yaml(s.to_yaml()) == s
    assert InterventionSpec.from_json(s.to_json()) == s
    for name in ("s.yaml", "s.json"):
        assert InterventionSpec.load(s.save(tmp_path / name)) == s


def test_hand_written_yaml_slices_stay_slices() -> None:
    # YAML 1.1 would read 3:10 as the base-60 integer 190.
    s = InterventionSpec.from_yaml(
        "- codebook: layers.0.mlp_out\n  codes: 3\n  positions: 3:10\n"
        "- {codebook: layers.0.mlp_out, codes: [4], positions: -1}\n"
    )
    assert s.edits[0].positions == "3:10"
    assert s.edits[0].positions_parsed == Positions("slice", start=3, stop=10)
    assert s.edits[1].positions_parsed == Positions("index", (-1,))


def test_generate_restores_each_module_mode() -> None:
    model = make()  # the wrapper is in train mode, its base in eval mode
    modes = {n: m.training for n, m in model.named_modules()}
    generate(model, None, [1, 2], max_new_tokens=2)
    assert {n: m.training for n, m in model.named_modules()} == modes


# ---------------------------------------------------------------------- CLI
def _word_tokenizer(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_cli_generate_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from codebook_lens.cli import main

    model = make()
    folder = model.save_pretrained(tmp_path / "m", tokenizer=_word_tokenizer(tmp_path))
    s = spec(EditSpec("layers.0.mlp_out", [3, 4], positions="all", scale=30.0))
    path = s.save(tmp_path / "spec.yaml")
    argv = [
        "generate",
        str(folder),
        "w1 w2 w3",
        "--intervene",
        str(path),
        "--n",
        "3",
        "--temperature",
        "0.05",
    ]
    assert main([*argv, "--max-new-tokens", "6", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "unsteered" in text and "| steered" in text
    assert main([*argv, "--max-new-tokens", "6", "--seed", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["unsteered"]) == len(out["steered"]) == 3
    assert all(g["text"].startswith("w") or g["text"] == "" for g in out["steered"])
    assert out["unsteered"] != out["steered"]
    # The columns show the same texts as the JSON.
    assert out["unsteered"][0]["text"].split()[0] in text


def test_cli_generate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from codebook_lens.cli import main

    folder = make().save_pretrained(tmp_path / "m")  # no tokenizer saved
    assert main(["generate", str(folder), "hello"]) == 2
    assert "no saved tokenizer, so give token ids" in capsys.readouterr().err
    assert main(["generate", str(folder), "1 2", "--intervene", str(tmp_path / "x.yaml")]) == 2
    assert "x.yaml: intervention spec file not found" in capsys.readouterr().err
    bad = InterventionSpec([EditSpec("layers.0.nope", 1)]).save(tmp_path / "bad.json")
    assert main(["generate", str(folder), "1 2", "--intervene", str(bad)]) == 2
    assert "known codebooks: ['layers.0.attn_heads'" in capsys.readouterr().err
    assert main(["generate", str(folder), "1 2 99", "--max-new-tokens", "3"]) == 2
    assert "ids must be in 0 .. 63" in capsys.readouterr().err
