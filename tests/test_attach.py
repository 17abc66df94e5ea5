"""attach_codebooks on GPT-2, GPT-NeoX and Llama: identity when off, codes, save/load, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from codebook_lens import CodebookConfig, CodebookModel, attach_codebooks

IDS = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))
ALL = ["attn_heads", "attn_out", "mlp_out", "residual"]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_codebooks_off_equals_base_and_detach_restores(arch: str) -> None:
    base = tiny_model(arch)
    ref = logits(base)
    model = attach_codebooks(base, CodebookConfig(num_codes=16, k=2, placements=ALL))
    on = logits(model)
    assert not torch.equal(on, ref), "codebooks on must change the logits"
    with model.disabled():
        assert torch.equal(logits(model), ref)
    model.enabled = False
    assert torch.equal(logits(model), ref)
    model.enabled = True
    plain = model.detach()
    assert torch.equal(logits(plain), ref)


def test_codes_by_name_and_shape(arch: str) -> None:
    model = attach_codebooks(tiny_model(arch), CodebookConfig(num_codes=16, k=3, placements=ALL))
    assert list(model.codebooks)[:4] == [f"layers.0.{p}" for p in ALL]
    codes = model.get_codes(IDS)
    assert set(codes) == {f"layers.{i}.{p}" for i in range(2) for p in ALL}
    assert codes["layers.1.attn_heads"].shape == (2, 10, 4, 3)
    assert codes["layers.0.mlp_out"].shape == (2, 10, 3)
    assert codes["layers.0.residual"].shape == (2, 10, 3)
    assert int(codes["layers.0.mlp_out"].max()) < 16


def test_codes_determine_the_activation(arch: str) -> None:
    """The hooked activation really is the decoding of the recorded codes."""
    model = attach_codebooks(
        tiny_model(arch), CodebookConfig(num_codes=16, k=2, placements=["mlp_out"])
    )
    seen = {}
    mlp = dict(model.base.named_modules())[model.sites[0].module]
    h = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    # Our hook was registered first, so this later hook sees the quantized output.
    codes = model.get_codes(IDS)
    h.remove()
    torch.testing.assert_close(
        seen["out"], model.codebooks["layers.0.mlp_out"].decode(codes["layers.0.mlp_out"])
    )


def test_layer_selection_and_globs() -> None:
    base = tiny_model("gpt2", layers=3)
    m = attach_codebooks(
        base, CodebookConfig(num_codes=8, k=1, placements=["mlp_out"], layers=[0, -1])
    )
    assert list(m.codebooks) == ["layers.0.mlp_out", "layers.2.mlp_out"]
    m.detach()
    m = attach_codebooks(
        base, CodebookConfig(num_codes=8, k=1, placements=[], modules=["transformer.h.*.mlp.c_fc"])
    )
    assert list(m.codebooks) == [f"transformer.h.{i}.mlp.c_fc" for i in range(3)]
    assert m.sites[0].dim == 128
    m.detach()


def test_save_load_round_trip(tmp_path: Path, arch: str) -> None:
    model = attach_codebooks(
        tiny_model(arch), CodebookConfig(num_codes=16, k=2, placements=["attn_heads", "mlp_out"])
    )
    model.train()
    for _ in range(2):  # touch the statistics so they are worth saving
        model(input_ids=IDS)
        model.step()
    model.eval()
    ref, ref_codes = logits(model), model.get_codes(IDS)
    out = model.save_pretrained(tmp_path / "m")
    assert {
        "codebook_config.json",
        "codebooks.safetensors",
        "config.json",
        "model.safetensors",
    } <= {p.name for p in out.iterdir()}
    loaded = CodebookModel.from_pretrained(out)
    loaded.eval()
    for n in model.codebooks:
        assert torch.equal(loaded.codebooks[n].counts, model.codebooks[n].counts)
        assert torch.equal(loaded.codebooks[n].steps_unused, model.codebooks[n].steps_unused)
    assert torch.equal(logits(loaded), ref)
    codes = loaded.get_codes(IDS)
    assert all(torch.equal(codes[n], ref_codes[n]) for n in ref_codes)
    # The folder is also a plain transformers model.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    with model.disabled():
        assert torch.equal(logits(plain), logits(model))


def test_training_step_changes_codebooks_and_model(arch: str) -> None:
    model = attach_codebooks(
        tiny_model(arch), CodebookConfig(num_codes=16, k=2, placements=["attn_heads", "mlp_out"])
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = model(input_ids=IDS, labels=IDS)
        loss = out.loss + model.codebook_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


def test_generate_records_codes_over_steps() -> None:
    model = attach_codebooks(
        tiny_model("gpt2"), CodebookConfig(num_codes=16, k=1, placements=["mlp_out"])
    )
    with model.record_codes() as rec:
        out = model.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    assert rec["layers.0.mlp_out"].shape[:2] == (1, 8)  # prompt + 4 fed-back tokens


# ------------------------------------------------------------------ errors
def test_unknown_placement() -> None:
    with pytest.raises(ValueError, match="placements='mlp' is invalid; choose 'attn_heads'"):
        CodebookConfig(placements=["mlp"])


def test_glob_matching_nothing_lists_nearby_names() -> None:
    with pytest.raises(
        ValueError, match=r"glob 'transformer.h.0.mlpp' matches no module.*transformer.h.0.mlp"
    ):
        attach_codebooks(
            tiny_model("gpt2"), CodebookConfig(placements=[], modules=["transformer.h.0.mlpp"])
        )


def test_layer_index_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"index 5 is out of range .* 2 blocks"):
        attach_codebooks(tiny_model("gpt2"), CodebookConfig(layers=[5]))


def test_heads_that_do_not_divide_width() -> None:
    from codebook_lens import CodebookLayer

    with pytest.raises(ValueError, match="dim=30 is invalid for groups=4"):
        CodebookLayer(30, 8, 1, groups=4)


def test_directory_without_codebook_config(tmp_path: Path) -> None:
    tiny_model("gpt2").save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="no codebook_config.json"):
        CodebookModel.from_pretrained(tmp_path / "plain")


def test_truncated_weights_file(tmp_path: Path) -> None:
    model = attach_codebooks(tiny_model("gpt2"), CodebookConfig(num_codes=8, k=1))
    out = model.save_pretrained(tmp_path / "m")
    w = out / "codebooks.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"codebooks.safetensors: corrupted or truncated"):
        CodebookModel.from_pretrained(out)


def test_config_with_wrong_field_type(tmp_path: Path) -> None:
    import json

    model = attach_codebooks(tiny_model("gpt2"), CodebookConfig(num_codes=8, k=1))
    out = model.save_pretrained(tmp_path / "m")
    manifest = json.loads((out / "codebook_config.json").read_text())
    manifest["config"]["k"] = "eight"
    (out / "codebook_config.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=r"codebook_config.json: config: field 'k' has value 'eight'"
    ):
        CodebookModel.from_pretrained(out)


def test_failed_save_writes_nothing(tmp_path: Path) -> None:
    model = attach_codebooks(tiny_model("gpt2"), CodebookConfig(num_codes=8, k=1))

    class BadTokenizer:
        def save_pretrained(self, path: object) -> None:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path / "m", tokenizer=BadTokenizer())
    assert list(tmp_path.iterdir()) == []
    # A failed save over an existing model keeps the old one intact.
    good = model.save_pretrained(tmp_path / "m")
    before = (good / "codebooks.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        model.save_pretrained(tmp_path / "m", tokenizer=BadTokenizer())
    assert (good / "codebooks.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_eval_mode_restores_each_modules_own_mode_even_on_error() -> None:
    from codebook_lens.model.codebook_model import eval_mode

    model = attach_codebooks(tiny_model("gpt2"), CodebookConfig(num_codes=16, k=2))
    model.train()
    model.base.eval()  # a frozen base under trainable codebooks
    before = {name: mod.training for name, mod in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not any(mod.training for mod in model.modules())
        raise RuntimeError("boom")
    assert {name: mod.training for name, mod in model.named_modules()} == before
