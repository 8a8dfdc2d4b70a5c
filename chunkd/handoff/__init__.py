"""Hand-offs: where a finished, valid file goes (see :mod:`chunkd.handoff.base`)."""

from chunkd.config import Config
from chunkd.handoff.base import Handoff, Job, Outcome
from chunkd.handoff.command import CommandHandoff
from chunkd.handoff.folder import FolderHandoff
from chunkd.handoff.whisperx import WhisperXHandoff

#: Each hand-off's one-time claims by its recorded name (``chunkd retry`` frees them).
ONCE_CLAIMS: dict[str, tuple[str, ...]] = {
    h.name: h.once_claims for h in (FolderHandoff, CommandHandoff, WhisperXHandoff)
}


def make_handoff(config: Config) -> Handoff:
    """The hand-off ``config.handoff`` names."""
    if config.handoff == "whisperx":
        assert config.whisperx_url is not None
        return WhisperXHandoff(
            config.whisperx_url,
            token=config.whisperx_token,
            act_as_user=config.whisperx_credentials == "user",
            defaults=config.whisperx_defaults,
            submit_timeout=config.whisperx_timeout,
            poll_interval=config.whisperx_poll_interval,
            retries=config.handoff_retries,
            retry_delay=config.handoff_retry_delay,
            retry_window=config.whisperx_retry_window,
            stall_timeout=config.whisperx_stall_timeout,
            max_duration=config.whisperx_max_duration,
        )
    if config.handoff == "command":
        assert config.handoff_command is not None
        return CommandHandoff(config.handoff_command)
    return FolderHandoff(config.completed_dir)


__all__ = [
    "ONCE_CLAIMS",
    "CommandHandoff",
    "FolderHandoff",
    "Handoff",
    "Job",
    "Outcome",
    "WhisperXHandoff",
    "make_handoff",
]
