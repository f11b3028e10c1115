"""Bundled recipes: ``default.yaml`` (the default release) and ``example.yaml`` (what ``quantmill init`` writes)."""
