"""Grouped matmuls of the dropless path: `jax.lax.ragged_dot`, tokamax's kernels, and our Pallas
kernels (`grouped_matmul` chooses; `pallas_grouped_matmul` holds ours).
"""
