"""The model stage: the codebook layer, attaching it to Hugging Face causal LMs, checkpoint formats."""
