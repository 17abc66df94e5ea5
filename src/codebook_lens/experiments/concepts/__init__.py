"""Concept battery (METHOD.md section 3): are codes cleaner units than neurons, over many concepts?

For each concept of a battery (a YAML file: regexes over the text, tokens, token sets,
document labels), on the same evaluated tokens of a code cache:

- **code**: the best single code of any codebook by F1 (precision = fraction of the code's
  firings on concept tokens, recall = fraction of concept tokens where it fires);
- **neuron**: at the same site (the codebook's input, before quantization), the best single
  activation dimension with its best threshold, either sign (``analysis.best_neurons``, the
  neuron baseline of ``analysis.neuron_baseline``);
- **control**: k-means on the BASE model's activations at the same site (same number of codes
  and k, the same similarity, the top-k nearest centroids per token and head), then its best
  code: what training with the bottleneck adds over clustering a model that never had one;
- **precise code**: among codes with precision >= 0.9 (and a few firings), the one with the
  best recall, the paper's notion of a clean feature.

``score_concepts`` does the scoring on arrays (tests plant codes and neurons in a synthetic
cache); ``run_concepts`` is the command: model, cache and base model (trained the way
``experiment topics`` trains them, or reused), the battery, ``report.md`` / ``report.html`` and
``metrics.json``.

Modules: ``config`` (``ConceptsConfig``), ``battery`` (concepts and where they occur),
``scoring`` (codes, neurons, controls per concept; the summary), ``controls`` (base model
activations, the k-means control), ``run`` (``run_concepts``), ``report``.
"""

from codebook_lens.experiments.concepts.battery import (
    CONCEPT_KINDS,
    Concept,
    ConceptKind,
    builtin_battery_path,
    concept_positions,
    load_battery,
)
from codebook_lens.experiments.concepts.config import ConceptsConfig
from codebook_lens.experiments.concepts.controls import (
    kmeans_codes,
    kmeans_like,
    module_activations,
)
from codebook_lens.experiments.concepts.report import write_concepts_report
from codebook_lens.experiments.concepts.run import (
    Prepared,
    add_contexts,
    locate_concepts,
    prepare,
    run_concepts,
    site_units,
)
from codebook_lens.experiments.concepts.scoring import (
    ConceptResult,
    NeuronMatch,
    SiteCodes,
    best_code,
    code_counts,
    format_summary,
    precise_code,
    score_concepts,
    summarize,
)

__all__ = [
    "CONCEPT_KINDS",
    "Concept",
    "ConceptKind",
    "ConceptResult",
    "ConceptsConfig",
    "NeuronMatch",
    "Prepared",
    "SiteCodes",
    "add_contexts",
    "best_code",
    "builtin_battery_path",
    "code_counts",
    "concept_positions",
    "format_summary",
    "kmeans_codes",
    "kmeans_like",
    "load_battery",
    "locate_concepts",
    "module_activations",
    "precise_code",
    "prepare",
    "run_concepts",
    "score_concepts",
    "site_units",
    "summarize",
    "write_concepts_report",
]
