"""Training a run: the loop (`loop`), the jitted steps and train state (`steps`), the optimiser
(`optimizer`), checkpoints, the workdir's files, progress records, preemption, reading a trained run
back (`trained_run`) and re-scoring it (`evaluation`).
"""
