"""Experiment configs: one file per model family (`--config=configs/switch.py:size=tiny`), the size and
data tables (`configs.sizes`), the argument-string parser (`configs.arguments`) and the builders the
files share (`configs.builders`). Run from the repository root, where `configs` is importable."""
