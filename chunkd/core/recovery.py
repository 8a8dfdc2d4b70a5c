"""Recovery: finish what a dead process left half-done, from what the store says.

Every ``interval`` seconds each chunkd process scans the store for

- a finalize claimed long ago with no outcome (its process died between the claim and the
  task): it is finalized again, with the claim's task id;
- a whole tus upload never finalized (its process died between the last byte and the
  finalize), once its last write is :data:`TUS_FINALIZE_GRACE` old;
- a task not in a final stage that nobody drives (its lease is stale, or ``chunkd retry``
  queued it again): the runner adopts it, and the hand-off resumes from what it remembered.

The policy lives here; the store only offers the scan. Several processes may recover at once:
the finalize claim and the task lease let exactly one of them act.
"""

from __future__ import annotations

import logging

from chunkd.core.finalize import finalize, stuck
from chunkd.core.tasks import TaskRunner
from chunkd.core.tus import ready_to_finalize
from chunkd.errors import ChunkdError
from chunkd.store.base import SessionStore

log = logging.getLogger("chunkd.recovery")

#: The process that received a tus upload's last byte finalizes it at once (with the user's
#: credential, which recovery does not have): recovery only steps in this long after.
TUS_FINALIZE_GRACE = 30.0


async def recover_once(store: SessionStore, runner: TaskRunner) -> None:
    now = store.clock()
    for state in await store.scan():
        sid = state.meta.session_id
        try:
            if stuck(state, now):
                await finalize(store, runner, sid)
                log.info("finished the interrupted finalize of session %s", sid)
            elif ready_to_finalize(state) and (
                now - (state.last_write or state.meta.created_at) > TUS_FINALIZE_GRACE
            ):
                await finalize(store, runner, sid)
                log.info("finalized tus upload %s, whole but never finalized", sid)
            elif state.task is not None and not state.task.stage.is_final:
                await runner.adopt(state)
        except ChunkdError as exc:
            log.info("recovery of session %s: %s", sid, exc.message)
        except Exception:  # one session's trouble must not stop the others' recovery
            log.exception("recovery of session %s failed", sid)
