"""Checkpoints: our directory format, Hugging Face directories and hub names,
imports from other systems, per-node chunks and stage streams, inspection."""
from .format import CheckpointError, CheckpointInfo, build_stage, read_info, save_checkpoint
from .sources import Checkpoint, Loaded, LoadOptions, load_model, load_stage, open_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "CheckpointInfo", "build_stage", "Loaded", "LoadOptions",
           "load_model",
           "load_stage", "open_checkpoint", "read_info", "save_checkpoint"]
