"""The frozen, validated configuration dataclasses of a run: the MoE layer and its capacity
(`layer`), the decoder (`model`), their enumerated choices (`enums`), training (`train`), data
(`data`), the mesh (`mesh`), the whole experiment (`experiment`), the shared checks (`validation`)
and the bridge to ml_collections ConfigDicts and config.json (`config_dict`).
"""
