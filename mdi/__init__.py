"""mdi: model-distributed inference for GPT models."""
import os

# OpenMP worker threads that spin while waiting for work steal the cores of
# other nodes (and of everything else) on a shared machine: measured here, a
# 2-thread decode fell from ~1500 to ~16 tokens/s next to another busy
# process. Passive waiting costs nothing measurable when the cores are free.
# It must be set before torch is first imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
