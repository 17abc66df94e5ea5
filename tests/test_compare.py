"""``experiment compare``: every method fitted by its own library, scored on ground truth and TokFSM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from codebook_lens.experiments.compare import METHODS, CompareConfig


def test_bad_config_values_name_the_field() -> None:
    for kwargs, field in [
        ({"methods": ["sae_magic"]}, "methods"),
        ({"workloads": ["mnist"]}, "workloads"),
        ({"seeds": [1, 2]}, "seeds"),
        ({"seeds": [0, 1, 2]}, "seeds"),  # holds the dev seed
        ({"k": 0}, "k"),
        ({"k": 2000}, "k"),
        ({"lr_factors": [0.0]}, "lr_factors"),
        ({"size": "huge"}, "size"),
        ({"orthogonalize": "true"}, "orthogonalize"),
        ({"training_samples": 10}, "training_samples"),
        ({"fsm_sequences": 2}, "fsm_sequences"),
        ({"fsm_k": -1}, "fsm_k"),
        ({"lm_k": -1}, "lm_k"),
        ({"lm_eval_tokens": 10}, "lm_eval_tokens"),
        ({"methods": []}, "methods"),
    ]:
        with pytest.raises(ValueError, match=field):
            CompareConfig(**kwargs)  # type: ignore[arg-type]


def test_identity_dictionary_keeps_the_k_largest() -> None:
    from codebook_lens.experiments.compare import IdentityDictionary

    d = IdentityDictionary(5, 2)
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, 0.0]])
    z = d.encode(x)
    assert torch.equal(z, torch.tensor([[0.0, -3.0, 2.0, 0.0, 0.0]]))
    assert torch.equal(d.decode(z), z) and torch.equal(d.W_dec, torch.eye(5))


def test_quick_compare_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("sae_lens")
    pytest.importorskip("sparsify")
    from codebook_lens.experiments.compare import run_compare

    cfg = CompareConfig(quick=True, out=str(tmp_path))
    metrics = run_compare(cfg)
    for name in ("report.md", "report.html", "metrics.json", "config.json", "synthetic_l0.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["compare"]) == {"synthetic", "fsm", "lm"}
    table = saved["compare"]["synthetic"]
    assert set(table) == set(METHODS)
    for method, m in table.items():
        for name in ("mcc", "f1", "explained_variance", "l0", "dead_fraction"):
            assert math.isfinite(m[name]["mean"]) and math.isfinite(m[name]["std"]), (method, name)
            assert len(m[name]["values"]) == len(cfg.seeds)
        assert 0 <= m["mcc"]["mean"] <= 1 and 0 <= m["f1"]["mean"] <= 1, method
        assert 0 <= m["dead_fraction"]["mean"] <= 1, method
        assert m["explained_variance"]["mean"] <= 1, method
        # every method fires k latents per sample (BatchTopK: k on average over a batch)
        assert m["l0"]["mean"] == pytest.approx(cfg.k, rel=0.1), method
    for k in cfg.k_values():
        assert set(saved["l0"]["synthetic"][str(k)]) == set(METHODS)
    for method, s in saved["lr"]["synthetic"].items():
        assert s["lr"] in [t["lr"] for t in s["tried"]], method
        assert len(s["tried"]) == len(cfg.lr_factors), method
        assert all(len(c) > 0 for c in saved["curves"]["synthetic"][method].values()), method
    # the trained sparse autoencoder reconstructs better than the untrained identity baseline
    ev = {m: table[m]["explained_variance"]["mean"] for m in table}
    assert ev["sparsify_topk"] > ev["neuron"]
    assert metrics["seeds"] == {"dev": cfg.dev_seed, "scored": cfg.seeds}
    assert "SynthSAEBench" in (tmp_path / "report.md").read_text()
    check_tokfsm(saved, cfg, tmp_path)
    check_lm(saved, cfg, tmp_path)


def check_lm(saved: dict, cfg: CompareConfig, out: Path) -> None:
    """The quick run's LM section: every method, finite metrics in range, and a dictionary
    that reconstructs exactly scores a CE-loss score of 1 (SAELens's definition)."""
    from codebook_lens.experiments.compare import IdentityDictionary
    from codebook_lens.experiments.compare.lm import ce_score, lm_run, reference_losses, scored_data

    table = saved["compare"]["lm"]
    assert set(table) == {*METHODS, "codebook_finetuned"}
    model = saved["lm_model"]
    assert set(model["seeds"]) == {str(s) for s in cfg.seeds}
    for method, m in table.items():
        for name in ("concept_f1_mean", "concept_precision_mean", "concept_recall_mean"):
            assert 0 < m[name]["mean"] <= 1, (method, name)
            assert len(m[name]["values"]) == len(cfg.seeds), (method, name)
        for name in ("explained_variance", "l0", "dead_fraction", "ce_increase"):
            assert math.isfinite(m[name]["mean"]), (method, name)
        assert m["explained_variance"]["mean"] <= 1 and 0 <= m["dead_fraction"]["mean"] <= 1
        # codebooks and neurons fire exactly k per token; an SAE's ReLU may leave fewer
        # (BatchTopK fires k on average over its training batches, not per token)
        if method in ("codebook_posthoc", "kmeans", "neuron", "codebook_finetuned"):
            assert m["l0"]["mean"] == pytest.approx(model["k"]), method
        else:
            assert 0 < m["l0"]["mean"] <= 2 * model["k"], method
    for seed, f1 in saved["lm_concept_f1"]["codebook_finetuned"].items():
        assert len(f1) == model["seeds"][seed]["concepts"] > 0
    assert (out / "lm_concept_scatter.png").is_file()
    assert "BBC language model" in (out / "report.md").read_text()
    run = lm_run(cfg, cfg.seeds[0], lambda _m: None)  # the saved models, reused
    data = scored_data(cfg, run)
    ref = reference_losses(run.base, run, data)
    site = run.sites[0]
    exact = IdentityDictionary(int(data.acts[site.name].shape[1]), 1)
    exact.keep = exact.d_in  # every dimension kept: the reconstruction is the activation
    got = ce_score(run.base, run, data, site, exact, ref)
    assert got["ce_increase"] == pytest.approx(0, abs=1e-5)
    if ref.ablated[site.name] > ref.clean:
        assert got["ce_loss_score"] == pytest.approx(1, abs=1e-4)


def test_lm_run_must_be_a_finished_topics_run(tmp_path: Path) -> None:
    from codebook_lens.experiments.compare.lm import saved_topics_config

    with pytest.raises(ValueError, match="lm_run="):
        saved_topics_config(tmp_path)


def check_tokfsm(saved: dict, cfg: CompareConfig, out: Path) -> None:
    """The quick run's TokFSM section: every method, finite metrics in range."""
    table = saved["compare"]["fsm"]
    assert set(table) == {*METHODS, "codebook_finetuned"}
    layers = saved["fsm_model"]["layers"]
    assert len(layers) == 2
    for method, m in table.items():
        names = ["pure_fraction", "mean_best_f1", "dead_fraction"]
        names += [f"{n}@{layer}" for n in ("pure_fraction", "mean_best_f1") for layer in layers]
        for name in [*names, "explained_variance", "l0"]:
            assert math.isfinite(m[name]["mean"]) and math.isfinite(m[name]["std"]), (method, name)
            assert len(m[name]["values"]) == len(cfg.seeds), (method, name)
        for name in names:
            assert 0 <= m[name]["mean"] <= 1, (method, name)
        assert m["explained_variance"]["mean"] <= 1, method
        assert 0 < m["l0"]["mean"] <= saved["fsm_model"]["num_latents"], method
        # a pure latent has F1 >= the threshold, so pure states bound the mean best F1 below
        assert m["mean_best_f1"]["mean"] >= 0.9 * m["pure_fraction"]["mean"] - 1e-9, method
    for s in saved["lr"]["fsm"].values():
        for layer in layers:
            assert s["layers"][layer]["lr"] in [t["lr"] for t in s["layers"][layer]["tried"]]
    for method, m in table.items():
        for name in ("steer_success", "steer_top_e_on_target", "steer_mass_on_target"):
            assert 0 <= m[name]["mean"] <= 1, (method, name)
    assert 0 <= saved["fsm_unsteered"]["steer_success"]["mean"] <= 1
    assert (out / "fsm_curves.png").is_file()
    assert "TokFSM" in (out / "report.md").read_text()


def test_state_table_ignores_unfired_slots() -> None:
    from codebook_lens.experiments.fsm.metrics import state_code_table

    # two tokens of state 0 fire latent 2 (one also fires nothing more: -1); state 1 fires 1
    codes = torch.tensor([[2, -1], [2, -1], [1, 2]])
    labels = torch.tensor([0, 0, 1])
    t = state_code_table("x", codes, labels, num_states=2, num_codes=3)
    assert t.counts.sum() == 4  # the -1 slots are not counted
    assert list(t.code) == [2, 1]
    assert t.recall[0] == 1 and t.precision[0] == pytest.approx(2 / 3)
    assert t.precision[1] == 1 and t.recall[1] == 1


def test_typical_values_are_the_mean_where_the_latent_fires() -> None:
    from codebook_lens.experiments.compare.tokfsm import typical_values

    z = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # state 0's latent 0 fires at 2 and 4; state 1's latent 1 never fires anywhere: 1
    assert typical_values(z, labels, torch.tensor([0, 1])).tolist() == [3.0, 1.0]


def test_thin_averages_each_stretch_over_its_own_length() -> None:
    from codebook_lens.experiments.compare.methods import thin

    curve = [(i + 1, 1.0) for i in range(7)]  # stretches of 3, 3 and 1 steps
    assert thin(curve, points=3) == [(3, 1.0), (6, 1.0), (7, 1.0)]


def test_a_saved_demo_is_reused_only_for_the_same_settings(tmp_path: Path) -> None:
    from dataclasses import asdict

    from codebook_lens.experiments.compare.tokfsm import demo_config, finished_demo

    demo = demo_config(CompareConfig(quick=True))
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "demo_config.json").write_text(json.dumps({**asdict(demo), "threads": 7}))
    assert finished_demo(tmp_path, demo)
    assert not finished_demo(tmp_path, demo_config(CompareConfig(quick=True, fsm_seed=1)))


def test_lm_workload_reads_a_saved_topics_run(tmp_path: Path) -> None:
    from codebook_lens.experiments.compare import run_compare
    from codebook_lens.experiments.topics import TopicsConfig, run_topics

    topics = tmp_path / "topics"
    run_topics(TopicsConfig(quick=True, out=str(topics), progress=False))
    cfg = CompareConfig(
        quick=True, out=str(tmp_path / "cmp"), workloads=["lm"], lm_run=str(topics),
        methods=["neuron", "codebook_finetuned"],
    )  # fmt: skip
    saved = run_compare(cfg)
    model = saved["lm_model"]
    assert model["given"] == str(topics)
    # the given run is used at every seed: nothing is trained into the output folder
    assert {s["folder"] for s in model["seeds"].values()} == {str(topics)}
    assert not (tmp_path / "cmp" / "lm_topics").exists()
    ours = saved["compare"]["lm"]["codebook_finetuned"]
    # the same model and held-out articles at every seed: its figures do not vary
    assert ours["concept_f1_mean"]["std"] == pytest.approx(0, abs=1e-12)
    assert set(saved["compare"]["lm"]) == {"neuron", "codebook_finetuned"}
