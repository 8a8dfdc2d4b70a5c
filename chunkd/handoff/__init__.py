"""Hand-offs: where a finished, valid file goes (see :mod:`chunkd.handoff.base`)."""

from chunkd.config import Config
from chunkd.handoff.base import STAGES, FinishedUpload, Handoff, HandoffFailed, Job
from chunkd.handoff.folder import FolderHandoff


def make_handoff(config: Config) -> Handoff:
    """The hand-off ``config.handoff`` names."""
    return FolderHandoff(config.data_dir / "completed")


__all__ = [
    "STAGES", "FinishedUpload", "FolderHandoff", "Handoff", "HandoffFailed", "Job", "make_handoff",
]
