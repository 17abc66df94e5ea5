"""Sparse autoencoders (sparsify, SAELens) and codebooks behind one dictionary interface.

The SAEs are trained here by their own libraries' trainers on a tiny local GPT-2, saved with
their own save methods and loaded back through the adapters.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from codebook_lens.codes.saes import (
    CodebookDictionary,
    LatentEdit,
    as_dictionary,
    capture_activations,
    load_saelens,
    load_sparsify,
    load_sparsify_run,
    record_latents,
    saelens_site,
    splice,
)
from codebook_lens.model.layer import CodebookLayer

VOCAB = 64


def token_batch(n: int, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("groups", "reduction"), [(1, "sum"), (4, "mean")])
def test_codebook_as_sae_reconstructs_its_forward(groups: int, reduction: str) -> None:
    layer = CodebookLayer(16, 32, k=3, groups=groups, reduction=reduction, seed=0).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    z = layer.encode(x)
    assert z.shape == (2, 5, groups * 32) and layer.W_dec.shape == (groups * 32, 16)
    assert ((z != 0).sum(-1) == groups * 3).all(), "k codes fire per token and head"
    out = layer(x).output
    torch.testing.assert_close(layer.decode(z), out)
    torch.testing.assert_close(z @ layer.W_dec, out)
    top = CodebookDictionary(layer).top_k(x)
    codes = layer(x).codes.reshape(2, 5, groups, 3)
    offsets = torch.arange(groups).view(1, 1, groups, 1) * 32
    assert torch.equal(top.indices.sort(-1).values, (codes + offsets).flatten(2).sort(-1).values)


def test_codebook_steering_changes_logits_and_leaves_no_trace() -> None:
    model = tiny_model("gpt2")
    ids = token_batch(2, 8)
    layer = CodebookLayer(32, 16, k=2, seed=0).eval()
    dictionary = CodebookDictionary(layer, module="transformer.h.0")
    with torch.no_grad():
        before = model(ids).logits
        with splice(model, dictionary, []):
            assert torch.equal(model(ids).logits, before), "no edit: the activation is kept"
        with splice(model, dictionary, [LatentEdit(3, 5.0, positions=(-1,))]):
            steered = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(steered[:, -1], before[:, -1])
    assert torch.equal(steered[:, :-1], before[:, :-1]), "earlier positions are untouched"
    assert torch.equal(after, before)


def test_saelens_hook_names_map_to_hf_modules() -> None:
    model = tiny_model("gpt2")
    expected = {
        "blocks.1.hook_resid_pre": ("transformer.h.1", "input"),
        "blocks.1.hook_resid_post": ("transformer.h.1", "output"),
        "blocks.1.hook_mlp_out": ("transformer.h.1.mlp", "output"),
        "blocks.1.hook_attn_out": ("transformer.h.1.attn", "output"),
        "blocks.1.attn.hook_z": ("transformer.h.1.attn.c_proj", "input"),
    }
    for name, (module, hook) in expected.items():
        site = saelens_site(model, name)
        assert (site.module, site.hook) == (module, hook), name
    ids = token_batch(1, 6)
    with (
        capture_activations(model, saelens_site(model, "blocks.0.hook_resid_post")) as post,
        capture_activations(model, saelens_site(model, "blocks.1.hook_resid_pre")) as pre,
        torch.no_grad(),
    ):
        model(ids)
    assert torch.equal(post[0], pre[0])
    with pytest.raises(ValueError, match="hook_resid_post"):
        saelens_site(model, "blocks.0.hook_resid_mid")
    with pytest.raises(ValueError, match="2 blocks"):
        saelens_site(model, "blocks.7.hook_resid_post")


def test_missing_peer_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "sparsify", None)
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(ImportError, match=r"codebook-lens\[saes\]"):
        load_sparsify(tmp_path)
    with pytest.raises(ImportError, match=r"codebook-lens\[saes\]"):
        load_saelens(str(tmp_path))


def test_sparsify_topk_trained_saved_loaded_recorded(tmp_path: Path) -> None:
    from datasets import Dataset
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer

    model = tiny_model("gpt2")
    data = Dataset.from_dict({"input_ids": token_batch(32).tolist()}).with_format("torch")
    cfg = TrainConfig(
        SaeConfig(num_latents=64, k=4),
        batch_size=8,
        hookpoints=["h.0"],
        log_to_wandb=False,
        save_dir=str(tmp_path),
        run_name="run",
    )
    torch.manual_seed(0)
    Trainer(cfg, data, model).fit()

    run = load_sparsify_run(tmp_path / "run")
    assert list(run) == ["h.0"]
    dictionary = load_sparsify(tmp_path / "run" / "h.0")
    assert (dictionary.kind, dictionary.num_latents, dictionary.d_in, dictionary.k) == (
        "sparsify_topk",
        64,
        32,
        4,
    )
    site = dictionary.site(model)
    assert site.module == "transformer.h.0"
    sae = SparseCoder.load_from_disk(tmp_path / "run" / "h.0")
    ids = token_batch(2, 8, seed=1)
    with (
        record_latents(model, dictionary) as rec,
        record_latents(model, sae, site) as raw,  # the peer's own object, wrapped on the fly
        capture_activations(model, site) as acts,
        torch.no_grad(),
    ):
        model(ids)
        own = sae.encode(acts[0].flatten(0, 1))
    assert rec.values.shape == rec.indices.shape == (2, 8, 4)
    assert torch.equal(raw.indices, rec.indices)
    values, order = own.top_acts.sort(-1, descending=True)
    torch.testing.assert_close(rec.values.flatten(0, 1), values)
    fired = values > 0
    assert torch.equal(rec.indices.flatten(0, 1)[fired], own.top_indices.gather(-1, order)[fired])
    torch.testing.assert_close(
        run["h.0"].decode(run["h.0"].encode(acts[0])),
        sae(acts[0].flatten(0, 1)).sae_out.view(2, 8, 32),
    )

    latent = int(rec.indices[0, -1, 0])
    with torch.no_grad():
        before = model(ids).logits
        with splice(model, dictionary, [LatentEdit(latent, 0.0)]):
            removed = model(ids).logits
        assert not torch.allclose(removed, before)
        assert torch.equal(model(ids).logits, before)


def saelens_activations(model: torch.nn.Module, hook_name: str) -> torch.Tensor:
    with capture_activations(model, saelens_site(model, hook_name)) as acts, torch.no_grad():
        model(token_batch(64))
    return torch.cat([a.flatten(0, 1) for a in acts])  # (tokens, d_model)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_saelens_trained_saved_loaded_recorded(arch: str, tmp_path: Path) -> None:
    from sae_lens import (
        SAE,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        SAETrainer,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    model = tiny_model("gpt2")
    hook_name = "blocks.0.hook_mlp_out"
    acts = saelens_activations(model, hook_name)
    meta = SAEMetadata(hook_name=hook_name, model_name="tiny-gpt2")
    torch.manual_seed(0)
    if arch == "batchtopk":
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=32, d_sae=64, k=4, metadata=meta)
        )
    else:
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=32, d_sae=64, k=4, matryoshka_widths=[16, 64], metadata=meta
        )
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    batches = (acts[i : i + 128] for _ in range(4) for i in range(0, len(acts), 128))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=128 * 24, train_batch_size_samples=128, lr=1e-3, lr_end=1e-3
    )
    SAETrainer(trainer_cfg, sae, batches).fit()
    sae.save_inference_model(tmp_path / "sae")

    dictionary = load_saelens(str(tmp_path / "sae"))
    assert dictionary.kind == f"saelens_{arch}" and dictionary.k is None
    assert dictionary.site(model).module == "transformer.h.0.mlp"
    own = SAE.load_from_disk(str(tmp_path / "sae"))
    ids = token_batch(2, 8, seed=1)
    with (
        record_latents(model, dictionary, k=8) as rec,
        capture_activations(model, dictionary.site(model)) as seen,
        torch.no_grad(),
    ):
        model(ids)
        z = own.encode(seen[0])
    assert rec.indices.shape == (2, 8, 8)
    values = z.sort(-1, descending=True).values[..., :8]
    torch.testing.assert_close(rec.values, values)
    fired = rec.indices >= 0
    assert torch.equal(z.gather(-1, rec.indices.clamp_min(0))[fired], rec.values[fired])
    assert torch.equal(fired, rec.values != 0)


def test_saelens_synthetic_eval_scores_a_codebook() -> None:
    from sae_lens.synthetic import (
        ActivationGenerator,
        FeatureDictionary,
        eval_sae_on_synthetic_data,
    )

    torch.manual_seed(0)
    features = FeatureDictionary(64, 16, seed=0)
    generator = ActivationGenerator(64, firing_probabilities=0.03)
    layer = CodebookLayer(16, 64, k=2, similarity="inner_product", kmeans_iters=5, seed=0)
    with torch.no_grad():
        layer.init_kmeans(features(generator.sample(2048)))
    result = eval_sae_on_synthetic_data(layer, features, generator, num_samples=1024)  # type: ignore[arg-type]
    for name in ("mcc", "explained_variance", "sae_l0"):
        assert math.isfinite(getattr(result, name)), name
    assert math.isfinite(result.classification.f1_score)
    assert 0 <= result.mcc <= 1 and result.sae_l0 == 2.0
    assert as_dictionary(layer).kind == "codebook"
