"""attach_codebooks on every causal-LM architecture of the installed transformers.

One session fixture builds each tiny model once and runs every check on it
(``codebook_lens.model.architecture_checks``); the tests below assert on those results, and
``docs/architectures.md`` must equal what the same results render to.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from codebook_lens import CodebookConfig, attach_codebooks
from codebook_lens.model import architecture_checks as A
from codebook_lens.model.config import PLACEMENTS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architectures.md"
TYPES = A.checked_types()
DOC_VERSION_INSTALLED = (
    DOC.is_file() and f"transformers {transformers.__version__} " in DOC.read_text(encoding="utf-8")
)

NO_ATTENTION = "has no softmax attention"
NO_MLP = "has no MLP"
UNAVAILABLE: dict[str, dict[str, str]] = {
    # State-space / recurrent models: no attention anywhere (Mamba-1/2 blocks have no MLP either).
    "mamba": {"attn_heads": NO_ATTENTION, "attn_out": NO_ATTENTION, "mlp_out": NO_MLP},
    "mamba2": {"attn_heads": NO_ATTENTION, "attn_out": NO_ATTENTION, "mlp_out": NO_MLP},
    "falcon_mamba": {"attn_heads": NO_ATTENTION, "attn_out": NO_ATTENTION, "mlp_out": NO_MLP},
    "rwkv": {"attn_heads": NO_ATTENTION, "attn_out": NO_ATTENTION},
    "xlstm": {"attn_heads": NO_ATTENTION, "attn_out": NO_ATTENTION},
    # Mixture of attention heads: the heads are routed experts whose output projection runs
    # inside JetMoeMoA.reduce on flattened, permuted tokens: no module sees (batch, seq, heads).
    "jetmoe": {"attn_heads": "no attention output projection that reads the concatenated heads"},
    # AltUp keeps 4 predictions of the residual stream stacked in front: (4, batch, seq, width).
    "gemma3n_text": {"residual": "not (batch, seq, width)"},
    # Two attention sub-layers per decoder layer (a ModuleList), so no single per-block place.
    "longcat_flash": {"attn_heads": "attention sub-layers", "attn_out": "attention sub-layers"},
}
"""Placements an architecture cannot take, and words its ValueError must contain."""


@pytest.fixture(scope="session")  # builds ~140 tiny models: about a minute of CPU
def checks() -> dict[str, A.ArchitectureCheck]:
    return {c.model_type: c for c in A.check_architectures(TYPES, progress=False)}


def test_every_causal_lm_type_is_checked_or_skipped_with_a_reason() -> None:
    every = set(A.causal_lm_types())
    # (SKIPPED may name types another transformers version lacks; those are ignored)
    assert set(TYPES) | (set(A.SKIPPED) & every) == every
    assert not set(TYPES) & set(A.SKIPPED)
    assert all(len(why) > 20 for why in A.SKIPPED.values())
    assert {"gpt_neo", "opt", "gpt2", "gpt_neox", "llama", "mixtral", "mamba"} <= set(TYPES)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_architecture(model_type: str, checks: dict[str, A.ArchitectureCheck]) -> None:
    c = checks[model_type]
    if c.build_error and not DOC_VERSION_INSTALLED:
        # On another transformers version (make test-oldest / test-latest) a tiny model that
        # does not build or run on its own, before any codebook, is that version's problem.
        pytest.xfail(f"upstream, transformers {transformers.__version__}: {c.build_error}")
    if c.upstream_error and not DOC_VERSION_INSTALLED:
        pytest.xfail(f"upstream, transformers {transformers.__version__}: {c.upstream_error}")
    assert not c.build_error, c.build_error
    assert not c.upstream_error, c.upstream_error
    assert not c.error, c.error
    assert c.num_blocks >= 2
    attached: list[str] = []
    for p in PLACEMENTS:
        pc = c.placements[p]
        want_error = UNAVAILABLE.get(model_type, {}).get(p)
        if want_error:
            assert not pc.attached, f"{p} attached, but {model_type} lists it as unavailable"
            assert want_error in pc.error and f"model_type {model_type!r}" in pc.error, pc.error
            assert "modules=[" in pc.error, "the error must say what works instead"
            continue
        assert pc.attached, f"{p}: {pc.error}"
        attached += pc.codebooks
        layers = [
            int(m[1]) for m in (re.fullmatch(rf"layers\.(\d+)\.{p}", n) for n in pc.codebooks) if m
        ]
        assert len(layers) == len(pc.codebooks) and layers == sorted(layers), pc.codebooks
        assert all(0 <= i < c.num_blocks for i in layers)
        for name, shape in pc.code_shapes.items():
            if p == "attn_heads":
                # one codebook per query head on the concatenated head outputs (GQA: the
                # width is heads * head_dim, not the key/value width)
                assert shape == [A.BATCH, A.SEQ, c.num_heads, A.K], (name, shape)
                assert pc.widths[name] % c.num_heads == 0
            else:
                assert shape == [A.BATCH, A.SEQ, A.K], (name, shape)
        assert set(pc.code_shapes) == set(pc.codebooks)
        assert pc.changes_logits, f"{p}: codes on left the logits unchanged"
        assert pc.off_identical, f"{p}: model.disabled() logits differ from the base model's"
        assert pc.detach_identical, f"{p}: logits after detach() differ from the base model's"
    assert c.round_trip_identical, "save_pretrained / from_pretrained changed the logits"
    assert set(attached) <= set(c.codebooks_trained), "a training step left codebooks unchanged"


@pytest.mark.slow
def test_coverage(checks: dict[str, A.ArchitectureCheck]) -> None:
    """At least 40 architectures with all four placements, GPT-Neo and OPT among them."""
    full = [t for t, c in checks.items() if all(pc.attached for pc in c.placements.values())]
    assert len(full) >= 40, full
    assert {"gpt_neo", "opt"} <= set(full)
    by_module = {t: checks[t].placements["attn_heads"].modules[0] for t in ("gpt_neo", "opt")}
    assert by_module == {"gpt_neo": "attn.attention.out_proj", "opt": "self_attn.out_proj"}
    assert checks["opt"].placements["mlp_out"].modules[0] == "fc2"  # OPT: no MLP submodule


@pytest.mark.slow
def test_doc_is_generated_from_these_results(checks: dict[str, A.ArchitectureCheck]) -> None:
    import transformers

    text = DOC.read_text(encoding="utf-8")
    if f"transformers {transformers.__version__} " not in text.split("\n\n", 2)[1]:
        pytest.skip(
            f"docs/architectures.md was generated for another transformers version; installed "
            f"{transformers.__version__}. Regenerate: codebook-lens architectures --write {DOC}"
        )
    assert text == A.architectures_markdown([checks[t] for t in TYPES]), (
        "docs/architectures.md is stale: run `codebook-lens architectures --write "
        "docs/architectures.md`"
    )


# ------------------------------------------------------- structure, one model each (fast)
def test_no_attention_error_names_architecture_placement_and_what_works() -> None:
    base = A.tiny_model("mamba")
    with pytest.raises(ValueError) as err:
        attach_codebooks(base, CodebookConfig(num_codes=8, k=1, placements=["attn_heads"]))
    msg = str(err.value)
    assert msg.startswith(
        "placement 'attn_heads' is not available on MambaForCausalLM (model_type 'mamba'): "
        "MambaBlock has no softmax attention (its token mixer is MambaMixer)"
    )
    assert "placements that work on this model: ['residual']" in msg
    assert "modules=['backbone.layers.*.mixer']" in msg
    # The excerpt documented in docs/errors.md is what users see.
    errors_doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    assert "is not available on MambaForCausalLM (model_type 'mamba')" in errors_doc
    # ... and the glob it suggests works.
    model = attach_codebooks(
        base, CodebookConfig(num_codes=8, k=1, placements=[], modules=["backbone.layers.*.mixer"])
    )
    assert model.get_codes(torch.ones(1, 4, dtype=torch.long))["backbone.layers.1.mixer"].shape == (
        1,
        4,
        1,
    )


def test_hybrid_takes_attention_placements_on_attention_blocks_only() -> None:
    base = A.tiny_model("jamba")  # block 0: Mamba, block 1: attention
    model = attach_codebooks(base, CodebookConfig(num_codes=8, k=1, placements=["attn_heads"]))
    assert list(model.codebooks) == ["layers.1.attn_heads"]
    model.detach()
    with pytest.raises(
        ValueError,
        match=r"layers=\[0\] is invalid for placement 'attn_heads'.*"
        r"block 0: JambaMambaDecoderLayer has no softmax attention.*blocks with it: \[1\]",
    ):
        attach_codebooks(base, CodebookConfig(placements=["attn_heads"], layers=[0]))


def test_grouped_query_heads_wider_than_the_hidden_size() -> None:
    """attn_heads quantizes heads * head_dim (96 here), not hidden_size (64) or the KV width."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        intermediate_size=96, num_hidden_layers=2, vocab_size=64,
    )  # fmt: skip
    model = attach_codebooks(
        AutoModelForCausalLM.from_config(cfg).eval(),
        CodebookConfig(num_codes=8, k=2, placements=["attn_heads"]),
    )
    site = model.sites[0]
    assert (site.module, site.dim, site.groups) == ("model.layers.0.self_attn.o_proj", 96, 4)
    assert model.codebooks["layers.0.attn_heads"].head_dim == 24
    assert model.get_codes(torch.ones(2, 3, dtype=torch.long))["layers.1.attn_heads"].shape == (
        2,
        3,
        4,
        2,
    )


def test_opt_mlp_out_on_flattened_tokens_is_the_decoding_of_its_codes() -> None:
    """OPT runs fc1/fc2 on (batch * seq, width); codes still come out as (batch, seq, k)."""
    model = attach_codebooks(
        A.tiny_model("opt"), CodebookConfig(num_codes=16, k=2, placements=["mlp_out"])
    )
    site = model.sites[0]
    assert (site.module, site.flat) == ("model.decoder.layers.0.fc2", True)
    seen = {}
    fc2 = dict(model.base.named_modules())[site.module]
    h = fc2.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    ids = torch.randint(1, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    codes = model.get_codes(ids)["layers.0.mlp_out"]
    h.remove()
    assert codes.shape == (2, 5, 2)
    decoded = model.codebooks["layers.0.mlp_out"].decode(codes)
    torch.testing.assert_close(seen["out"], decoded.reshape(10, -1))


def test_one_module_shared_by_two_blocks_is_refused() -> None:
    base = A.tiny_model("gpt2")
    base.transformer.h[1].mlp = base.transformer.h[0].mlp
    with pytest.raises(ValueError, match="would hook the same module object"):
        attach_codebooks(base, CodebookConfig(num_codes=8, k=1, placements=["mlp_out"]))


def test_cli_architectures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from codebook_lens.cli import main

    assert main(["architectures", "--only", "opt,mamba"]) == 0
    out = capsys.readouterr().out
    assert "| `opt` | OPTForCausalLM | yes | yes | yes | yes |" in out
    assert "| `mamba` | MambaForCausalLM | no: MambaBlock has no softmax attention" in out
    doc = tmp_path / "arch.md"
    assert main(["architectures", "--only", "gpt_neo", "--write", str(doc)]) == 0
    assert "| `gpt_neo` | GPTNeoForCausalLM | yes | yes | yes | yes |" in doc.read_text()
    assert main(["architectures", "--only", "gpt_neoo"]) == 2
    assert "model_type='gpt_neoo' is not a causal-LM architecture" in capsys.readouterr().err
    assert main(["architectures", "--write", str(tmp_path / "no" / "x.md")]) == 2
    assert "does not exist" in capsys.readouterr().err
