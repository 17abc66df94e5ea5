"""Topic steering (METHOD.md section 3): force a topic's codes on, and generations follow.

Pipeline, on the BBC News corpus (5 topics):

1. a codebook model (codebooks on the attention heads) trained on the LM split of BBC;
2. a code cache over those documents; for each topic, the codes that fire throughout that
   topic's documents and rarely elsewhere (high document coverage and high precision);
3. generation from neutral prompts ("The", "Yesterday", ...) without and with those codes forced
   on at every position (``intervene.generate`` with a paired seed);
4. each generation is judged by a topic classifier trained on held-out BBC articles that the LM
   never saw (multinomial naive Bayes on words, uniform prior); the fluency check is the
   perplexity of the generations under the model with no intervention.

Modules: ``config`` (``TopicsConfig``, the prompts), ``classifier`` (the judge), ``corpus``
(splits), ``model`` (the trained or reused models and the code cache), ``codes`` (finding and
ranking topic codes), ``sampling`` (paired samples, their likelihood), ``steering`` (specs, the
tuning sweep, the evaluation samples), ``run`` (``run_topics``), ``report``.
"""

from codebook_lens.experiments.topics.classifier import TopicClassifier, words
from codebook_lens.experiments.topics.codes import (
    TopicCode,
    cap_per_head,
    code_effects,
    find_topic_codes,
    rank_by_effect,
    token_topic_llr,
    topic_code_pools,
)
from codebook_lens.experiments.topics.config import NEUTRAL_PROMPTS, TUNE_PROMPTS, TopicsConfig
from codebook_lens.experiments.topics.corpus import Splits, interleave, split_corpus
from codebook_lens.experiments.topics.model import (
    TopicModels,
    prepare_model,
    prepare_model_and_cache,
)
from codebook_lens.experiments.topics.report import (
    format_ppl,
    textwrap_lines,
    write_topics_report,
)
from codebook_lens.experiments.topics.run import ratio, run_topics
from codebook_lens.experiments.topics.sampling import (
    generation_nll,
    prompt_ids,
    sample_condition,
    sample_prompts,
    steering_contexts,
)
from codebook_lens.experiments.topics.steering import (
    choose_setting,
    evaluate_conditions,
    steering_spec,
    tune_settings,
)

__all__ = [
    "NEUTRAL_PROMPTS",
    "TUNE_PROMPTS",
    "Splits",
    "TopicClassifier",
    "TopicCode",
    "TopicModels",
    "TopicsConfig",
    "cap_per_head",
    "choose_setting",
    "code_effects",
    "evaluate_conditions",
    "find_topic_codes",
    "format_ppl",
    "generation_nll",
    "interleave",
    "prepare_model",
    "prepare_model_and_cache",
    "prompt_ids",
    "rank_by_effect",
    "ratio",
    "run_topics",
    "sample_condition",
    "sample_prompts",
    "split_corpus",
    "steering_contexts",
    "steering_spec",
    "textwrap_lines",
    "token_topic_llr",
    "topic_code_pools",
    "tune_settings",
    "words",
    "write_topics_report",
]
