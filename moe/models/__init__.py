"""The decoder in which dense and sparse are one model (`transformer`), decoding with a KV cache
(`decode`, `sampling`), sparse upcycling (`upcycle`) and parameter and FLOP counts (`accounting`).
"""
