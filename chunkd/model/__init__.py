"""Pure data, no I/O: what a session is (:mod:`.session`) and what its task is (:mod:`.task`)."""

from chunkd.model.session import ChunkReceipt, Claim, Phase, SessionMeta, SessionState
from chunkd.model.task import Stage, Step, Task

__all__ = ["ChunkReceipt", "Claim", "Phase", "SessionMeta", "SessionState", "Stage", "Step", "Task"]
