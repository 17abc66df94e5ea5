"""The paper's experiments end to end, one package each (config, run, report): fsm, topics, concepts."""
