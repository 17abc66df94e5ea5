"""The codes stage: the code cache, search, analysis, interventions, and SAEs as dictionaries."""
