"""Each compared method fitted to the same activations at a matched size and L0.

Every trained method sees the same training samples in the same order (one tensor
``(N, d_in)``, ``batch_size`` rows per step) and is trained by its own library's trainer:

- ``codebook_posthoc``: a ``CodebookLayer`` (inner-product codes, k-means start) trained with
  Adam on reconstruction alone (the activation is not part of a model here);
- ``sparsify_topk``: sparsify's ``Trainer`` with its defaults (SignSGD + schedule-free,
  its learning rate for the width). The trainer reads activations from a model's modules, so
  the samples are served by a lookup module (``ActivationTable``): "token" ``i`` makes the
  hookpoint output sample ``i``; the trained SAE is loaded back from the folder the trainer
  saves (schedule-free's averaged weights are what it saves);
- ``saelens_batchtopk`` / ``saelens_matryoshka``: SAELens's ``SAETrainer`` with the settings of
  its synthetic-data helper ``train_toy_sae`` (Adam, constant rate 3e-4);
- ``neuron``: the identity dictionary (each input dimension a latent, the ``k`` largest by
  magnitude kept), untrained;
- ``kmeans``: a ``CodebookLayer`` initialised by k-means and not trained further.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from codebook_lens.codes.saes import (
    CodebookDictionary,
    DenseDictionary,
    Dictionary,
    SAELensDictionary,
    load_sparsify,
)
from codebook_lens.codes.saes.dictionary import require
from codebook_lens.model.layer import CodebookLayer

RECOMMENDED_LR = {
    "codebook_posthoc": 1e-3,
    "saelens_batchtopk": 3e-4,
    "saelens_matryoshka": 3e-4,
}
"""Recommended learning rates (SAELens: ``train_toy_sae`` and the SynthSAEBench docs; the
codebook: Adam's usual 1e-3). sparsify's comes from its trainer (``sparsify_lr``)."""

TRAINED = ("codebook_posthoc", "sparsify_topk", "saelens_batchtopk", "saelens_matryoshka")
SPARSIFY_SEQ = 64
"""Samples per "sequence" of the lookup dataset sparsify's trainer reads."""


@dataclass
class Fitted:
    """One fitted method: its dictionary, learning rate and training curve."""

    method: str
    dictionary: Dictionary
    lr: float | None
    """The learning rate it was trained at (None: not trained)."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(samples seen, training loss) along the run; the loss is each library's own
    (reconstruction MSE for the codebook and SAELens, FVU for sparsify)."""


@dataclass
class FitSpec:
    """What every method is matched on."""

    num_latents: int
    k: int
    batch_size: int
    seed: int
    device: str = "cpu"
    groups: int = 1
    """Codebooks of the post-hoc codebook and k-means control (``num_latents`` and ``k`` split
    evenly over them; one per attention head where the fine-tuned model has those)."""
    similarity: str = "inner_product"
    """Their code search: 'inner_product', or 'cosine' as the fine-tuned codebooks'."""


class IdentityDictionary(DenseDictionary):
    """Each input dimension is a latent (the best single neuron); the ``k`` largest by
    magnitude of each token fire, with their signed values."""

    def __init__(self, d_in: int, k: int) -> None:
        super().__init__()
        self.kind = "neuron"
        self.num_latents = self.d_in = d_in
        self.k = self.keep = k
        self.eye: Tensor
        self.register_buffer("eye", torch.eye(d_in))

    @property
    def W_dec(self) -> Tensor:
        return self.eye

    def encode(self, x: Tensor) -> Tensor:
        idx = x.abs().topk(self.keep, dim=-1).indices
        return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))

    def decode(self, z: Tensor) -> Tensor:
        return z


def sparsify_lr(num_latents: int) -> float:
    """sparsify's default learning rate for its default optimizer (SignSGD) at this width."""
    return 5e-3 / (num_latents / 2**14) ** 0.5


def recommended_lr(method: str, num_latents: int) -> float:
    """The learning rate each library recommends for ``method``."""
    if method == "sparsify_topk":
        return sparsify_lr(num_latents)
    return RECOMMENDED_LR[method]


def batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive ``(batch_size, d)`` rows of ``x`` (the last partial batch dropped)."""
    for i in range(0, len(x) - batch_size + 1, batch_size):
        yield x[i : i + batch_size]


def new_codebook(d_in: int, spec: FitSpec, x: Tensor) -> CodebookLayer:
    """A codebook of ``num_latents`` codes, ``k`` per token (both split over ``spec.groups``
    codebooks), k-means start."""
    torch.manual_seed(spec.seed)
    g = spec.groups
    layer = CodebookLayer(
        d_in,
        spec.num_latents // g,
        k=spec.k // g,
        groups=g,
        similarity=spec.similarity,
        seed=spec.seed,
    ).to(spec.device)
    with torch.no_grad():
        layer.init_kmeans(x[: max(16 * spec.num_latents, 8192)])
        # A token's output is the sum of its k codes (per codebook): scaled centroids make
        # that sum the mean of its k nearest centroids (the ranking is unchanged by the scale).
        layer.codebook.data /= spec.k // g
    return layer


def fit_codebook(x: Tensor, spec: FitSpec, lr: float) -> Fitted:
    """A post-hoc codebook: k-means start, then Adam on the reconstruction MSE."""
    layer = new_codebook(x.shape[1], spec, x)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    curve: list[tuple[int, float]] = []
    seen = 0
    layer.train()
    for batch in batches(x, spec.batch_size):
        out = layer(batch).output
        loss = (out - batch).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(batch)
        curve.append((seen, float(loss.detach())))
    layer.eval()
    return Fitted("codebook_posthoc", CodebookDictionary(layer), lr, thin(curve))


def thin(curve: list[tuple[int, float]], points: int = 100) -> list[tuple[int, float]]:
    """At most ``points`` entries, each the mean loss of its stretch of steps."""
    if len(curve) <= points:
        return curve
    size = math.ceil(len(curve) / points)
    stretches = [curve[i : i + size] for i in range(0, len(curve), size)]
    return [(part[-1][0], sum(v for _, v in part) / len(part)) for part in stretches]


class ActivationTable(nn.Module):
    """A stand-in "model" for sparsify's trainer: token ``i`` -> the stored sample ``i``.

    ``base_model.acts`` is the hookpoint; its output is the activations ``(B, S, d)``.
    """

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.acts = nn.Embedding.from_pretrained(x, freeze=True)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

    @property
    def base_model(self) -> ActivationTable:
        return self

    @property
    def device(self) -> torch.device:
        return self.acts.weight.device

    def forward(self, input_ids: Tensor, **_: Any) -> Tensor:
        return self.acts(input_ids)


def fit_sparsify(x: Tensor, spec: FitSpec, lr: float) -> Fitted:
    """sparsify's ``Trainer`` (its defaults) on the samples through ``ActivationTable``."""
    datasets = require("datasets", "the sparsify baseline")
    sparsify = require("sparsify", "the sparsify baseline")
    seq = SPARSIFY_SEQ if spec.batch_size % SPARSIFY_SEQ == 0 else spec.batch_size
    usable = len(x) // spec.batch_size * spec.batch_size
    ids = torch.arange(usable).view(-1, seq)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    model = ActivationTable(x[:usable])
    curve: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = sparsify.TrainConfig(
            sparsify.SaeConfig(num_latents=spec.num_latents, k=spec.k),
            batch_size=spec.batch_size // seq,
            hookpoints=["acts"],
            lr=lr,
            log_to_wandb=False,
            save_dir=tmp,
            run_name="run",
            init_seeds=[spec.seed],
            save_every=10**9,
        )
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer = sparsify.Trainer(cfg, data, model)
            sae = trainer.saes["acts"]
            hook = sae.register_forward_hook(
                lambda _m, _a, out: curve.append(
                    ((len(curve) + 1) * spec.batch_size, float(out.fvu.detach()))
                )
            )
            try:
                trainer.fit()
            finally:
                hook.remove()
        dictionary = load_sparsify(f"{tmp}/run/acts", device=spec.device)
    return Fitted("sparsify_topk", dictionary, lr, thin(curve))


def fit_saelens(method: str, x: Tensor, spec: FitSpec, lr: float) -> Fitted:
    """SAELens's ``SAETrainer`` with ``train_toy_sae``'s settings (Adam, constant rate)."""
    sae_lens = require("sae_lens", "the SAELens baselines")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name="blocks.0.hook_mlp_out")
    d_in = x.shape[1]
    torch.manual_seed(spec.seed)
    if method == "saelens_batchtopk":
        sae: Any = sae_lens.BatchTopKTrainingSAE(
            sae_lens.BatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=spec.num_latents, k=spec.k, metadata=meta, device=spec.device
            )
        )
    else:
        widths = matryoshka_widths(spec.num_latents)
        sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=spec.num_latents, k=spec.k, matryoshka_widths=widths,
                metadata=meta, device=spec.device,
            )
        )  # fmt: skip
    steps = len(x) // spec.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * spec.batch_size,
        train_batch_size_samples=spec.batch_size,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=spec.device,
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        dead_feature_window=1000,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
    )
    curve: list[tuple[int, float]] = []
    trainer = sae_lens.SAETrainer(trainer_cfg, sae, batches(x, spec.batch_size))
    original = trainer._train_step  # the trainer's own step; only its loss is read here

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        curve.append(((len(curve) + 1) * spec.batch_size, float(out.losses["mse_loss"].detach())))
        return out

    trainer._train_step = step  # type: ignore[method-assign]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit()
    sae.eval()
    return Fitted(method, SAELensDictionary(sae), lr, thin(curve))


def matryoshka_widths(num_latents: int) -> list[int]:
    """Nested prefixes of quarter, half and full width (at least one latent each)."""
    return sorted({max(1, num_latents // 4), max(1, num_latents // 2), num_latents})


def fit(method: str, x: Tensor, spec: FitSpec, lr: float | None = None) -> Fitted:
    """Fit ``method`` to ``x`` ``(N, d_in)``; ``lr`` only for the trained methods."""
    if method == "neuron":
        return Fitted(method, IdentityDictionary(x.shape[1], spec.k).to(spec.device), None)
    if method == "kmeans":
        return Fitted(method, CodebookDictionary(new_codebook(x.shape[1], spec, x).eval()), None)
    if lr is None:
        lr = recommended_lr(method, spec.num_latents)
    if method == "codebook_posthoc":
        return fit_codebook(x, spec, lr)
    if method == "sparsify_topk":
        return fit_sparsify(x, spec, lr)
    return fit_saelens(method, x, spec, lr)


@torch.no_grad()
def explained_variance(dictionary: Dictionary, x: Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over ``x`` ``(N, d)``."""
    dictionary.eval()
    x_hat = dictionary.decode(dictionary.encode(x))
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def sweep(
    method: str, x: Tensor, val: Tensor, spec: FitSpec, factors: list[float]
) -> dict[str, Any]:
    """Train ``method`` at each rate (recommended x factor); keep the best on ``val``.

    Returns ``{"lr": chosen, "recommended_lr", "tried": [{lr, val_explained_variance}],
    "fitted": the chosen Fitted}``.
    """
    base = recommended_lr(method, spec.num_latents)
    tried, best = [], None
    for f in factors:
        fitted = fit(method, x, spec, base * f)
        ev = explained_variance(fitted.dictionary, val)
        tried.append({"lr": base * f, "val_explained_variance": ev, "curve": fitted.curve})
        if best is None or ev > best[0]:
            best = (ev, fitted)
    assert best is not None
    return {"lr": best[1].lr, "recommended_lr": base, "tried": tried, "fitted": best[1]}
