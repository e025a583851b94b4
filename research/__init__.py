"""Research tooling outside the model library: sweeps of configs times seeds (`sweep`), their
reports and statistics (`report`, `plots`), matched dense baselines (`baselines`) and the
regeneration of docs/RESULTS.md (`results`). Run from the repository root.
"""
