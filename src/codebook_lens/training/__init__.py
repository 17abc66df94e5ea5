"""The training stage: corpora, base models, the loop, checkpoints, evaluation, the pipeline."""
