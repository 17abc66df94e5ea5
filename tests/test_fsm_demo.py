"""FSM demo: state-code tables, patching, divergence, options, and the quick run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from codebook_lens import CodebookConfig, attach_codebooks
from codebook_lens.cli import main
from codebook_lens.experiments.fsm import (
    Converged as _Converged,
    ConvergenceCheck,
    DemoConfig,
    FSMBatches,
    RowPatch as _RowPatch,
    build_base_model,
    js_divergence,
    parse_seeds,
    patched_next_state_probs as _patched_next_state_probs,
    run_seeds,
    seeds_report,
    state_code_table,
    summarize_seeds,
    train_stage,
)
from codebook_lens.experiments.fsm.data import TokFSM
from codebook_lens.training.loop import TrainConfig

REQUIRED_KEYS = [
    "wall_seconds", "base.transition_accuracy", "codebook.transition_accuracy",
    "base.first_transition_accuracy", "codebook.first_transition_accuracy", "base.loss",
    "codebook.loss", "state_codes.fraction_pure", "neurons.fraction_pure",
    *[f"interventions.{g}.success_rate" for g in ("none", "attn", "mlp", "all")],
]  # fmt: skip


def test_state_code_table_finds_a_planted_code() -> None:
    labels = torch.randint(0, 5, (400,))
    codes = (labels * 3 + 1).unsqueeze(1)  # state s fires code 3s+1, always and only
    table = state_code_table("layers.0.mlp_out", codes, labels, 5, 20)
    assert table.code.tolist() == [1, 4, 7, 10, 13]
    assert (table.precision == 1).all() and (table.recall == 1).all()
    assert table.fraction_pure(0.9) == 1.0


def test_state_code_table_hand_computed() -> None:
    # state 0: codes [2, 2, 3]; state 1: codes [2, 4]
    labels = torch.tensor([0, 0, 0, 1, 1])
    codes = torch.tensor([[2], [2], [3], [2], [4]])
    t = state_code_table("c", codes, labels, 2, 5)
    assert t.code[0] == 2
    assert t.precision[0] == pytest.approx(2 / 3) and t.recall[0] == pytest.approx(2 / 3)
    # state 1: code 4 has precision 1, recall 1/2 (F1 2/3) vs code 2 (1/3, 1/2 -> 0.4)
    assert t.code[1] == 4 and t.recall[1] == pytest.approx(0.5)
    assert t.fraction_pure(0.9) == 0.0


def test_js_divergence_bounds() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-9)
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert float(js_divergence(p, q)) == pytest.approx(math.log(2), rel=1e-6)


def test_row_patch_sets_codes_at_one_position() -> None:
    model = attach_codebooks(
        tiny_model("gpt2"), CodebookConfig(num_codes=16, k=1, placements=["attn_heads", "mlp_out"])
    )
    ids = torch.randint(1, 64, (3, 6))
    targets = {"layers.0.mlp_out": torch.tensor([[[5]], [[6]], [[7]]]),
               "layers.1.attn_heads": torch.full((3, 4, 1), 9)}  # fmt: skip
    before = model.get_codes(ids)
    for name, t in targets.items():
        model.codebooks[name].edit = _RowPatch(t, position=4, rows_per_target=1)
    try:
        after = model.get_codes(ids)
    finally:
        for name in targets:
            model.codebooks[name].edit = None
    assert after["layers.0.mlp_out"][:, 4, 0].tolist() == [5, 6, 7]
    assert (after["layers.1.attn_heads"][:, 4] == 9).all()
    assert torch.equal(after["layers.0.mlp_out"][:, :4], before["layers.0.mlp_out"][:, :4])
    assert torch.equal(model.get_codes(ids)["layers.0.mlp_out"], before["layers.0.mlp_out"])


def test_row_patch_sets_a_span_of_positions_per_row() -> None:
    model = attach_codebooks(
        tiny_model("gpt2"), CodebookConfig(num_codes=16, k=1, placements=["attn_heads", "mlp_out"])
    )
    ids = torch.randint(1, 64, (4, 7))
    span = torch.tensor([[3, 4], [5, 6]]).view(2, 2, 1, 1)  # (B, P, G, k), 2 rows per target
    before = model.get_codes(ids)["layers.1.mlp_out"]
    model.codebooks["layers.1.mlp_out"].edit = _RowPatch(span, position=2, rows_per_target=2)
    try:
        after = model.get_codes(ids)["layers.1.mlp_out"]
    finally:
        model.codebooks["layers.1.mlp_out"].edit = None
    assert after[:, 2:4, 0].tolist() == [[3, 4], [3, 4], [5, 6], [5, 6]]
    assert torch.equal(after[:, :2], before[:, :2])


@pytest.mark.parametrize("scope", ["last", "transition"])
def test_patching_codes_from_the_same_sequence_changes_nothing(scope: str) -> None:
    cfg = DemoConfig.quick(num_codes=32)
    fsm = TokFSM(cfg.fsm_config())
    model = attach_codebooks(build_base_model(cfg, fsm), cfg.codebook_config()).eval()
    model.codebooks["layers.0.mlp_out"].init_kmeans(torch.randn(64, cfg.width))
    tokens, _ = fsm.sample_with_states(5, torch.Generator().manual_seed(0), 1 + 3 * fsm.num_digits)
    names = list(model.codebooks)
    groups = {"none": [], "attn": names[::2], "all": names}
    with torch.no_grad():
        out, first = _patched_next_state_probs(model, fsm, tokens, tokens, groups, [scope])  # type: ignore[list-item]
    probs = out[scope]
    assert probs["none"].shape == (5, fsm.num_states) and first["none"].shape == (5, fsm.vocab_size)
    assert (probs["none"] > 0).all() and (probs["none"].sum(-1) <= 1 + 1e-5).all()
    for g in ("attn", "all"):  # a sequence's own codes patched into itself: nothing moves
        assert torch.allclose(probs[g], probs["none"], atol=1e-6)
    # Codes from other sequences do move the prediction.
    other, _ = fsm.sample_with_states(5, torch.Generator().manual_seed(1), tokens.shape[1])
    with torch.no_grad():
        moved, _ = _patched_next_state_probs(model, fsm, tokens, other, groups, [scope])  # type: ignore[list-item]
    assert not torch.allclose(moved[scope]["all"], probs["none"], atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_states": 1}, "num_states=1 is invalid"),
        ({"num_edges": 200}, "num_edges=200 is invalid"),
        ({"base": 1}, "base=1 is invalid"),
        ({"width": 130, "heads": 4}, "width=130 is invalid for heads=4"),
        ({"k": 5, "num_codes": 4}, "k=5 is invalid"),
        ({"codebook_warmup_steps": 1500}, "codebook_warmup_steps=1500 is invalid"),
        ({"commitment_weight": -1.0}, "commitment_weight=-1.0 is invalid"),
        ({"rotary_scale": 0.0}, "rotary_scale=0.0 must be in"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_rotary_scale_multiplies_the_frequencies_and_survives_saving(
    arch: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    cfg = DemoConfig.quick(arch=arch, width=32, heads=2, mlp_width=32, rotary_scale=math.pi)
    fsm = TokFSM(cfg.fsm_config())
    model = build_base_model(cfg, fsm).eval()
    plain = build_base_model(DemoConfig.quick(arch=arch, width=32, heads=2, mlp_width=32), fsm)
    (freq,) = {m.inv_freq for n, m in model.named_modules() if n.endswith("rotary_emb")}
    (ref,) = {m.inv_freq for n, m in plain.named_modules() if n.endswith("rotary_emb")}
    torch.testing.assert_close(freq, ref * math.pi)
    assert freq[0].item() == pytest.approx(math.pi)  # the fastest frequency: period 2 tokens
    x = fsm.sample(2, torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits)
        assert not torch.allclose(plain.eval()(input_ids=x).logits, model(input_ids=x).logits)


def test_layer_norm_option_puts_the_codes_on_a_fixed_scale() -> None:
    cfg = DemoConfig.quick(width=32, heads=2, mlp_width=32, layer_norm=True)
    assert cfg.codebook_config().layer_norm and not DemoConfig.quick().codebook_config().layer_norm
    fsm = TokFSM(cfg.fsm_config())
    model = attach_codebooks(build_base_model(cfg, fsm), cfg.codebook_config()).eval()
    plain = attach_codebooks(build_base_model(cfg, fsm), DemoConfig.quick().codebook_config())
    x = torch.randn(64, 32)
    shifted = 5.0 * x + 3.0  # another scale, and an offset on every feature
    with torch.no_grad():
        # normalised, the codes chosen for an input ignore its scale and offset; the plain
        # (cosine) codebook sees the offset
        layer = model.codebooks["layers.0.mlp_out"]
        assert torch.equal(layer(x).codes, layer(shifted).codes)
        layer = plain.eval().codebooks["layers.0.mlp_out"]
        assert not torch.equal(layer(x).codes, layer(shifted).codes)


def test_cli_bad_option_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--num-edges", "50", "--out", str(tmp_path / "x")]) == 2
    assert "num_edges=50 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "transition accuracy" in printed
    expected = {
        "report.html", "report.md", "metrics.json", "fsm.json", "demo_config.json",
        "state_codes.json", "training_curves.png", "state_code_heatmap.png",
        "codes_vs_neurons.png", "interventions.png", "base_model", "codebook_model",
    }  # fmt: skip
    assert expected <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED_KEYS:
        assert isinstance(metrics[key], float), key
        assert key == "wall_seconds" or 0.0 <= metrics[key] <= 1.0 or key.endswith("loss"), key
    # The saved models load and reproduce the reported codebook structure.
    from transformers import AutoModelForCausalLM

    from codebook_lens import CodebookModel

    cb = CodebookModel.from_pretrained(out / "codebook_model")
    assert {n for n in cb.codebooks if n.endswith("mlp_out")} == {
        "layers.0.mlp_out",
        "layers.1.mlp_out",
    }
    AutoModelForCausalLM.from_pretrained(out / "base_model", local_files_only=True)
    fsm = json.loads((out / "fsm.json").read_text())
    assert fsm["config"]["num_states"] == 12 and len(fsm["states"]) == 12
    # A second run into the same non-empty folder is refused without touching it.
    assert main(["demo", "--quick", "--out", str(out)]) == 2


# ------------------------------------------------------------- seeds and stopping
@pytest.mark.parametrize(
    ("text", "seeds"),
    [("0-4", [0, 1, 2, 3, 4]), ("0,2,5-7", [0, 2, 5, 6, 7]), ("3", [3]), (" 1, 1-2 ", [1, 2])],
)
def test_parse_seeds(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "4-2", "-1", "1,,2", "1-", "0-x"])
def test_parse_seeds_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="seeds=.* is invalid"):
        parse_seeds(text)


def _check_with(values: list[dict[str, float]], reference: float | None) -> ConvergenceCheck:
    """A ConvergenceCheck whose measurements are ``values``, one per check (no model runs)."""
    cfg = DemoConfig.quick(check_every=10, base_target=0.98, codebook_gap=0.01,
                           purity_tolerance=0.02)  # fmt: skip
    check = ConvergenceCheck(torch.nn.Linear(1, 1), TokFSM(cfg.fsm_config()), cfg, None, reference)  # type: ignore[arg-type]
    feed = iter(values)
    check.measure = lambda: next(feed)  # type: ignore[method-assign]
    return check


def test_base_check_stops_at_the_target() -> None:
    check = _check_with([{"transition_accuracy": 0.97}, {"transition_accuracy": 0.981}], None)
    check(5, {"step": 5, "lm_loss": 1.0})  # not a check step: nothing measured
    check(10, {"step": 10, "eval": {}})  # not a training record
    assert check.checks == []
    check(10, {"step": 10, "lm_loss": 1.0})
    assert check.reason == "" and len(check.checks) == 1
    with pytest.raises(_Converged):
        check(20, {"step": 20, "lm_loss": 1.0})
    assert check.checks[-1]["step"] == 20 and "98.1% >= 98.0%" in check.reason


def test_codebook_check_needs_accuracy_and_stable_purity() -> None:
    ta, pure = "transition_accuracy", "fraction_pure"
    values = [
        {ta: 0.975, pure: 0.70},  # close enough, but no previous purity to compare with
        {ta: 0.975, pure: 0.85},  # purity still moving (+15 points)
        {ta: 0.960, pure: 0.86},  # stable, but 2 points below the base
        {ta: 0.972, pure: 0.87},  # within 1 point and stable: converged
    ]
    check = _check_with(values, reference=0.98)
    for step in (10, 20, 30):
        check(step, {"step": step, "lm_loss": 1.0})
        assert check.reason == ""
    with pytest.raises(_Converged):
        check(40, {"step": 40, "lm_loss": 1.0})
    assert "97.2% within 1% of the base's 98.0%" in check.reason


def test_train_stage_stops_when_converged(tmp_path: Path) -> None:
    cfg = DemoConfig.quick(check_every=10)
    fsm = TokFSM(cfg.fsm_config())
    model = build_base_model(cfg, fsm)
    check = _check_with([{"transition_accuracy": 0.5}, {"transition_accuracy": 0.99}], None)
    tc = TrainConfig(steps=40, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=0,
                     checkpoint_every=0, log_every=5, progress=False, device="cpu")  # fmt: skip
    evals = [fsm.sample(4, torch.Generator().manual_seed(0))]
    res = train_stage("base", model, FSMBatches(fsm, 8, 0), tc, tmp_path / "b", check, evals)
    assert (res.stopped, res.steps, res.cap) == ("converged", 20, 40)
    assert [c["step"] for c in res.checks] == [10, 20]
    assert max(r["step"] for r in res.history) == 20 and model.training
    assert res.tokens == 20 * 8 * fsm.seq_len and res.cpu_seconds > 0
    # Without a criterion the stage runs to its cap.
    capped = train_stage("base", model, FSMBatches(fsm, 8, 1), tc, tmp_path / "c", None, evals)
    assert (capped.stopped, capped.steps) == ("step cap", 40)


def _fake_metrics(seed: int, cb_ta: float, pure: float) -> dict:
    stage = {"steps": 100, "cap": 200, "stopped": "converged", "reason": "why"}
    return {
        "base": {"transition_accuracy": 0.99, "first_transition_accuracy": 0.99},
        "codebook": {"transition_accuracy": cb_ta, "first_transition_accuracy": 0.97},
        "state_codes": {"fraction_pure": pure},
        "neurons": {"fraction_pure": 0.5},
        "interventions": {"all": {"success_rate": 0.9}},
        "training": {"base_steps": 100 + seed, "codebook_steps": 300},
        "stages": {"base": stage, "codebook": stage},
        "wall_seconds": 100.0 + seed,
        "cpu_seconds": 90.0,
        "threads": 1,
        "load_average": {"start": 1.0, "end": 1.0},
    }


def test_summarize_seeds_mean_worst_and_targets() -> None:
    data = summarize_seeds({0: _fake_metrics(0, 0.98, 0.9), 7: _fake_metrics(7, 0.94, 0.7)})
    agg = data["aggregate"]
    assert data["seeds"] == [0, 7]
    assert agg["codebook.transition_accuracy"]["mean"] == pytest.approx(0.96)
    assert agg["codebook.transition_accuracy"]["worst"] == pytest.approx(0.94)
    assert agg["codebook.transition_accuracy"]["worst_seed"] == 7
    assert agg["gap"]["worst"] == pytest.approx(0.05)  # the largest gap is the worst
    assert agg["wall_seconds"]["worst"] == 107.0
    held = data["targets_held"]
    assert held["codebook_transition_accuracy"] == 1 and held["within_3_points"] == 1
    assert held["pure_states"] == 1 and held["codes_beat_neurons"] == 2 and held["patching"] == 2
    assert data["all_targets_held"] == 1
    md = seeds_report(DemoConfig(), data).to_markdown()
    assert "| all of them | 1/2 |" in md and "| 7 |" in md and "0.5634" in md


def test_cli_seeds_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--seeds", "4-2", "--out", str(tmp_path / "a")]) == 2
    assert "seeds='4-2' is invalid" in capsys.readouterr().err
    assert (
        main(["demo", "--quick", "--seeds", "0-1", "--seed", "3", "--out", str(tmp_path / "b")])
        == 2
    )
    assert "drop --seed" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_seeds_refuses_a_foreign_seed_folder(tmp_path: Path) -> None:
    (tmp_path / "seed-1").mkdir(parents=True)
    (tmp_path / "seed-1" / "x.txt").write_text("not a run")
    with pytest.raises(ValueError, match="seed-1/, which is not a finished run"):
        run_seeds(DemoConfig.quick(), [0, 1], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed-1"]  # nothing ran


@pytest.mark.slow
def test_quick_demo_at_two_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seeds"
    assert main(["demo", "--quick", "--seeds", "3,5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 seeds: 3, 5" in printed and "all targets:" in printed
    assert {"seed-3", "seed-5", "summary.md", "summary.html", "summary.json"} <= {
        p.name for p in out.iterdir()
    }
    data = json.loads((out / "summary.json").read_text())
    assert data["seeds"] == [3, 5]
    for seed in (3, 5):
        cfg = json.loads((out / f"seed-{seed}" / "demo_config.json").read_text())
        assert cfg["seed"] == cfg["fsm_seed"] == seed  # a fresh machine and init per seed
    fsm3 = json.loads((out / "seed-3" / "fsm.json").read_text())["edges"]
    fsm5 = json.loads((out / "seed-5" / "fsm.json").read_text())["edges"]
    assert fsm3 != fsm5
    row = data["per_seed"][0]
    assert set(row["stages"]) == {"base", "codebook warm-up", "codebook"}
    assert row["stages"]["base"]["stopped"] in ("converged", "step cap")
    # Run again into the same folder: the finished seeds are reused, not re-trained.
    assert main(["demo", "--quick", "--seeds", "3,5", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 2
