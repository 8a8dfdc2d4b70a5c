"""Hand-offs: where a finished, valid file goes (see :mod:`chunkd.handoff.base`)."""

from chunkd.config import Config
from chunkd.handoff.base import STAGES, FinishedUpload, Handoff, HandoffFailed, Job
from chunkd.handoff.command import CommandHandoff
from chunkd.handoff.folder import FolderHandoff
from chunkd.handoff.whisperx import WhisperXHandoff


def make_handoff(config: Config) -> Handoff:
    """The hand-off ``config.handoff`` names."""
    if config.handoff == "whisperx":
        assert config.whisperx_url is not None
        return WhisperXHandoff(
            config.whisperx_url,
            token=config.whisperx_token,
            submit_timeout=config.whisperx_timeout,
            poll_interval=config.whisperx_poll_interval,
            retries=config.handoff_retries,
            retry_delay=config.handoff_retry_delay,
        )
    if config.handoff == "command":
        assert config.handoff_command is not None
        return CommandHandoff(config.handoff_command)
    return FolderHandoff(config.data_dir / "completed")


__all__ = [
    "STAGES", "CommandHandoff", "FinishedUpload", "FolderHandoff", "WhisperXHandoff", "Handoff", "HandoffFailed", "Job", "make_handoff",
]
