"""The codes stage: the code cache, search, analysis and interventions."""
