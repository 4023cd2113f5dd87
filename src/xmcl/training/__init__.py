"""The training loops of both systems, each written out, and the run pieces they share.

:mod:`.retrieval_trainer`: ``xmcl train``, the retrieval loop (USER or a baseline) with validation and ``best.pt``.
:mod:`.clip_trainer`: ``xmcl train-clip``, a small CLIP trained from scratch (a CGE teacher for the shapes world).
:mod:`.distill_trainer`: ``xmcl distill pretrain``, the ST-SLidR pretraining loop.
:mod:`.probe_trainer`: the probe's loops (linear, fine-tuning; ours and the authors') and ``run_probe``.
:mod:`.progress`: the progress record (epoch, steps, best score, loss sums, train time) saved whole in checkpoints.
:mod:`.run`: run folder, checkpointer (start / resume / refuse), the loop entry (``run_loop``), finite-loss check,
stop signals and their agreement across ranks, resume notes, step logger.
:mod:`.schedule`: optimisers and the warm-up + cosine learning-rate schedule.
:mod:`.sharding`: data-parallel sharding of an epoch's batches and the world-size check on resume.
"""
