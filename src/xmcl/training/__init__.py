"""Training infrastructure shared by both systems: the loop, checkpoints, logging and progress.

:mod:`.probe_trainer`: the probe's loops (linear, fine-tuning; ours and the authors') and ``run_probe``.
"""
