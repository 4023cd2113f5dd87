"""Training infrastructure shared by both systems: the loop, checkpoints, logging and progress."""
