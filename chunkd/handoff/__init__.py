"""Hand-offs: where a finished, valid file goes (see :mod:`chunkd.handoff.base`)."""

from chunkd.handoff.base import FinishedUpload, Handoff
from chunkd.handoff.folder import FolderHandoff

__all__ = ["FinishedUpload", "FolderHandoff", "Handoff"]
