"""The base layer both systems stand on: atomic file and folder writes, seeding and RNG state, devices, the run
controls every config shares, checkpoint files and the run log. Imports nothing of xmcl above ``config``."""
