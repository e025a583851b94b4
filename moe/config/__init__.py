"""The frozen, validated configuration dataclasses of a run: the model and its MoE layer (`model`),
their enumerated choices (`enums`), training (`train`), data (`data`), the mesh (`mesh`), the
whole experiment (`experiment`), the shared checks (`validation`) and the bridge to ml_collections
ConfigDicts and config.json (`config_dict`).
"""
