"""Checkpoints: our directory format, imports from other systems, per-node chunks."""
from .format import (CheckpointError, CheckpointInfo, build_stage, load_model, load_stage,
                     read_info, save_checkpoint)

__all__ = ["CheckpointError", "CheckpointInfo", "build_stage", "load_model", "load_stage",
           "read_info", "save_checkpoint"]
