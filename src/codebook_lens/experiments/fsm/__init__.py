"""The finite-state-machine demo (METHOD.md section 2): ``codebook-lens demo`` / ``make demo``.

1. Train a small causal transformer from scratch on TokFSM walks (the base model).
2. Fine-tune it with codebooks on every attention head and every MLP output (the codebook
   model; C=1000, k=1), starting from the base weights and k-means-initialised codebooks.
3. Measure both: next-token loss / accuracy, sampled transition accuracy, exact
   first-transition accuracy.
4. Claim 1: for each MLP codebook, the code <-> current-state table (precision, recall, F1 at the
   token that completes a state), against the best single MLP neuron of the base model.
5. Claim 2: patch the codes at the last position of a sequence in state ``a`` with those of a
   sequence in state ``b`` and check the next-state distribution moves to ``b``'s.
6. Write ``runs/fsm-<timestamp>/``: report.html/.md, metrics.json, fsm.json, configs, models.

Modules: ``config`` (``DemoConfig``), ``data`` (TokFSM and its metrics), ``stages`` (training
stages and the stop criterion), ``metrics`` (code <-> state tables, neurons, targets),
``patching`` (claim 2), ``report`` (reports and summaries), ``run`` (one run, several seeds).
"""

from codebook_lens.experiments.fsm.config import PATCH_GROUPS, DemoConfig, PatchGroup, PatchScope
from codebook_lens.experiments.fsm.metrics import (
    REFERENCE,
    TARGETS,
    StateCodeTable,
    check_targets,
    claim_one_tables,
    mlp_neuron_activations,
    mlp_state_tables,
    model_metrics,
    neuron_table,
    pure_states,
    state_code_table,
    state_positions,
)
from codebook_lens.experiments.fsm.patching import (
    RowPatch,
    intervention_experiment,
    js_divergence,
    patched_next_state_probs,
)
from codebook_lens.experiments.fsm.report import (
    SUMMARY_METRICS,
    seeds_report,
    seeds_summary,
    summarize_seeds,
    summary,
    write_report,
)
from codebook_lens.experiments.fsm.run import parse_seeds, run_demo, run_seeds
from codebook_lens.experiments.fsm.stages import (
    Converged,
    ConvergenceCheck,
    FSMBatches,
    StageResult,
    Validation,
    build_base_model,
    train_stage,
)

__all__ = [
    "PATCH_GROUPS", "REFERENCE", "SUMMARY_METRICS", "TARGETS", "ConvergenceCheck", "DemoConfig",
    "FSMBatches", "PatchGroup", "PatchScope", "StageResult", "StateCodeTable", "Validation",
    "Converged", "RowPatch", "patched_next_state_probs", "build_base_model", "check_targets",
    "claim_one_tables", "intervention_experiment", "js_divergence", "mlp_neuron_activations",
    "mlp_state_tables", "model_metrics", "neuron_table", "parse_seeds", "pure_states", "run_demo",
    "run_seeds", "seeds_report", "seeds_summary", "state_code_table", "state_positions",
    "summarize_seeds", "summary", "train_stage", "write_report",
]  # fmt: skip
