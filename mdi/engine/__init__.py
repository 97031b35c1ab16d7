"""The engine: sequences scheduled over the pipeline's lanes (see api.py)."""
from .api import EngineBusy, EngineFailure, Event, SeqParams, SeqStats
from .link import Link, LinkClosed, MemoryLink
from .local import LocalEngine
from .scheduler import PipelineEngine
from .sequence import Sequence

__all__ = ["EngineBusy", "EngineFailure", "Event", "Link", "LinkClosed", "LocalEngine",
           "MemoryLink", "PipelineEngine", "SeqParams", "SeqStats", "Sequence"]
