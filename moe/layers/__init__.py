"""The MoE feed-forward layer and its parts: the router and its losses (`routing`), sigmoid scores,
the selection bias and the pooled and per-sequence balance losses (`balancing`), the three dispatch
paths (`dispatch`), the expert FFNs (`ffn`), the layer itself (`moe_layer`) and dropless expert
parallelism (`expert_parallel`).
"""
