"""Parallelism: logical axis names (`axes`), meshes, rule tables and shardings (`sharding`) and
multi-host start-up (`distributed`).
"""
