"""Every benchmark of issue 8 runs in its tiny mode and writes its section (so none rots)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_layer_tiny(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    res = load("bench_layer").main(["--tiny", "--results", str(out)])
    saved = json.loads(out.read_text())["layer"]
    for key in (
        "ratio_to_matmul_floor",
        "speedup_vs_dense",
        "memory_ratio_vs_dense",
        "compute_floor_ratio",
        "compute_floor_ratio_bf16",
    ):
        assert saved[key] == pytest.approx(res[key]) and saved[key] > 0
    floor = saved["floor"]
    assert floor["peak_flops_fp32"] > 0 and floor["peak_flops_bf16"] > 0
    assert 0.9 <= saved["bf16_code_agreement"] <= 1.0
    # The ratio is the key case's time over the FLOP count at the measured peak.
    k = floor["key_case"]
    flops = 2 * k["tokens"] * k["num_codes"] * k["dim"]
    expected = floor["seconds"]["ours"] * floor["peak_flops_fp32"] / flops
    assert saved["compute_floor_ratio"] == pytest.approx(expected)
    assert all(c["compute_floor_ratio"] > 0 for c in saved["cases"])
    case = saved["cases"][0]
    assert set(case["seconds"]) >= {"floor", "ours", "dense", "ours_k1"}
    # The chunked layer never holds the whole score matrix; the dense formulation does.
    n, c = case["tokens"], case["num_codes"]
    assert case["peak_bytes"]["dense"] >= n * c * 4
    assert saved["issue2"]["grouped_8_heads"]["groups"] == 8
    if saved["faiss"] is not None:
        assert saved["faiss"]["flat_equals_exact"] is True


def test_bench_groups_tiny(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"other": {"kept": True}}))
    res = load("bench_groups").main(["--tiny", "--results", str(out)])
    saved = json.loads(out.read_text())
    assert saved["other"] == {"kept": True}, "other sections must survive"
    assert saved["groups"]["speedup_vs_loop"] == pytest.approx(res["speedup_vs_loop"])
    speedups = [c["speedup"] for c in saved["groups"]["cases"]]
    assert saved["groups"]["min_speedup_vs_loop"] == pytest.approx(min(speedups))
    assert all(c["same_codes"] for c in saved["groups"]["cases"])


@pytest.mark.slow
def test_bench_generate_tiny(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    res = load("bench_generate").main(["--tiny", "--results", str(out)])
    saved = json.loads(out.read_text())["generate"]
    assert saved["codebook_vs_base_throughput"] == pytest.approx(res["codebook_vs_base_throughput"])
    case = saved["cases"][0]
    assert case["base_tokens_per_s"] > 0 and case["codebook_tokens_per_s"] > 0


def test_bench_search_tiny_writes_its_headline(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    assert load("bench_search").main(["--tiny", "--results", str(out)]) == 0
    saved = json.loads(out.read_text())["search"]
    assert saved["tokens"] == 20_000 and len(saved["queries"]) == 4
    assert saved["seconds_1m_tokens"] == max(q["seconds"] for q in saved["queries"]) > 0
    assert saved["speedup_vs_loop"] == min(q["speedup_vs_loop"] for q in saved["queries"]) > 0


def test_run_all_tiny_runs_scripts_and_prints_headline(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_all.py"),
            "--tiny",
            "--only",
            "groups",
            "--results",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "groups.speedup_vs_loop" in proc.stdout
    assert re.search(r"layer\.ratio_to_matmul_floor +missing", proc.stdout)
    assert not re.search(r"groups\.speedup_vs_loop +missing", proc.stdout)
    assert "groups" in json.loads(out.read_text())


def test_peak_memory_counts_tensor_bytes() -> None:
    import torch

    common = load("common")

    def alloc() -> None:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more while a is alive
        del a, b

    peak = common.peak_extra_bytes(alloc)
    assert 8_000_000 <= peak < 8_100_000


REF_PYTHON = BENCH.parent / ".venv-ref" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(
    not REF_PYTHON.is_file(),
    reason="the reference venv (.venv-ref) is missing: run `make venv-ref` to compare with "
    "codebook-features 0.1.2",
)
def test_bench_reference_tiny_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    res = load("bench_reference").main(["--tiny", "--results", str(out)])
    saved = json.loads(out.read_text())["reference"]
    assert set(saved["layer_speedup"]) == {"256_x1_d16_C300_k2", "64_x4_d8_C100_k1"}
    assert saved["layer_speedup"] == pytest.approx(res["layer_speedup"])
    assert all(v > 0 for v in saved["layer_speedup"].values())
    assert 0 < saved["memory_ratio"] < 10 and set(saved["train_speedup"]) == {"tiny"}
    row = saved["layer"]["256_x1_d16_C300_k2"]
    assert row["reference"]["wall"] > 0 and row["reference_peak_bytes"] > 0


def test_bench_reference_without_venv_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    missing = tmp_path / "no-venv" / "python"
    assert (
        load("bench_reference").main(
            ["--tiny", "--ref-python", str(missing), "--results", str(out)]
        )
        == {}
    )
    assert "make venv-ref" in capsys.readouterr().out
    assert not out.exists(), "nothing measured, nothing written"


def test_bench_threads_tiny_runs_the_pair_and_records_the_slowdown(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    res = load("bench_threads").main(["--tiny", "--step-rates", "--results", str(out)])
    demo = res["demo"]
    assert len(demo["pair"]) == 2 and demo["alone"]["wall_s"] > 0
    assert demo["alone"]["threads_at_start"] >= 1  # the policy announced itself
    saved = json.loads(out.read_text())["threads"]
    assert saved["two_runs_slowdown"] == demo["two_runs_slowdown"] > 0
    rates = saved["step_rates"]
    assert set(rates) == {"passive", "active"} and set(rates["passive"]) == {"1", "2"}
    assert all(
        len(r["pair"]) == 2 and r["alone"] > 0 for by_n in rates.values() for r in by_n.values()
    )
