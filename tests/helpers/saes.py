"""SAEs trained by their own libraries (sparsify, SAELens) on a tiny local GPT-2, saved with
their own save methods: fixtures for the tests of SAEs in caches, search and the browser."""

from __future__ import annotations

from pathlib import Path

import torch

from codebook_lens.codes.saes import capture_activations, saelens_site


def token_batch(n: int, vocab: int, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def train_sparsify(
    model: torch.nn.Module, out: Path, *, vocab: int, hookpoints: list[str] | None = None
) -> Path:
    """A sparsify TopK SAE (64 latents, k=4) per hookpoint, trained by sparsify's ``Trainer``;
    returns the run folder (one hookpoint folder inside per SAE)."""
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    data = Dataset.from_dict({"input_ids": token_batch(32, vocab).tolist()}).with_format("torch")
    cfg = TrainConfig(
        SaeConfig(num_latents=64, k=4),
        batch_size=8,
        hookpoints=hookpoints or ["h.0"],
        log_to_wandb=False,
        save_dir=str(out),
        run_name="run",
    )
    torch.manual_seed(0)
    Trainer(cfg, data, model).fit()
    return out / "run"


def train_saelens(
    model: torch.nn.Module,
    out: Path,
    *,
    vocab: int,
    hook_name: str = "blocks.0.hook_mlp_out",
    arch: str = "batchtopk",
) -> Path:
    """A SAELens BatchTopK (or Matryoshka BatchTopK) SAE (64 latents, k=4) trained by
    ``SAETrainer`` on ``hook_name``'s activations; returns its folder."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        SAETrainer,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    with capture_activations(model, saelens_site(model, hook_name)) as seen, torch.no_grad():
        model(token_batch(64, vocab))
    acts = torch.cat([a.flatten(0, 1) for a in seen])  # (tokens, d_model)
    meta = SAEMetadata(hook_name=hook_name, model_name="tiny-gpt2")
    d_in = acts.shape[-1]
    torch.manual_seed(0)
    sae: torch.nn.Module
    if arch == "batchtopk":
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=64, k=4, metadata=meta)
        )
    else:
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=64, k=4, matryoshka_widths=[16, 64], metadata=meta
        )
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    batches = (acts[i : i + 128] for _ in range(4) for i in range(0, len(acts), 128))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=128 * 24, train_batch_size_samples=128, lr=1e-3, lr_end=1e-3
    )
    SAETrainer(trainer_cfg, sae, batches).fit()  # type: ignore[arg-type]
    sae.save_inference_model(out)  # type: ignore[operator]
    return out


def build_sae_cache(root: Path, *, sae_k: int = 64) -> dict[str, Path]:
    """A plain tiny GPT-2 folder (with its tokenizer), a sparsify run and a SAELens SAE trained
    on it, and a cache of both SAEs (``build_cache(..., dictionaries=...)``); their paths."""
    from conftest import tiny_model
    from test_cache import docs, small_tokenizer

    from codebook_lens.codes.cache import build_cache
    from codebook_lens.codes.saes import load_saes

    tok = small_tokenizer()
    model = tiny_model("gpt2", vocab=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    run = train_sparsify(model, root / "sparsify", vocab=len(tok))
    lens = train_saelens(model, root / "saelens", vocab=len(tok))
    saes = load_saes(run) + load_saes(lens)
    build_cache(model, tok, docs(), root / "cache", dictionaries=saes, sae_k=sae_k, progress=False)
    return {"model": root / "model", "run": run, "lens": lens, "cache": root / "cache"}
