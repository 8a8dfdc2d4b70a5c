"""The headline guarantees, each pinned by a test that fails without it (see `make mutate`):

- one driver per task: a runner whose lease was taken over is stopped and cannot write;
- exactly-once hand-off: a one-time claim left by a crash (no identifier recorded) is reported,
  never submitted or run a second time;
- a failed hand-off shows as ``failed`` in ``/status`` (with the error), not ``processing``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from chunkd.core.finalize import finalize
from chunkd.core.recovery import recover_once
from chunkd.core.tasks import TaskRunner
from chunkd.handoff.base import Job, Outcome
from chunkd.keys import STORE
from chunkd.model.task import Stage
from chunkd.progress import ProgressHub
from chunkd.store import FileSystemStore
from conftest import MEDIA, chunks_of, store_put, upload_all
from test_progress import chunkd_client
from whisperx_double import WhisperXDouble

OGG = (MEDIA / "speech.ogg").read_bytes()


class BlockingHandoff:
    """A hand-off that works until told to finish, and notes whether it was cancelled."""

    name = "command"
    inline = False
    once_claims: tuple[str, ...] = ()

    def __init__(self, message: str) -> None:
        self.message = message
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finish = asyncio.Event()

    async def run(self, job: Job) -> Outcome:
        self.started.set()
        await job.report("transcribing", 10, f"{self.message}: working")
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await job.report("aligning", 60, f"{self.message}: still here")
        return Outcome(message=self.message)


async def _finished_session(store: FileSystemStore) -> str:
    meta = await store.create(ttl=600, filename="speech.ogg", extension="ogg",
                              total_size=len(OGG), chunk_size=4096,
                              total_chunks=len(chunks_of(OGG, 4096)), language=None, model=None,
                              task_params={})
    for i, part in enumerate(chunks_of(OGG, 4096)):
        await store_put(store, meta, i, part)
    return meta.session_id


async def test_a_taken_over_runner_is_stopped_and_cannot_write(tmp_path: Path) -> None:
    root = tmp_path / "data"
    store_a = FileSystemStore(root)
    first = BlockingHandoff("A")
    runner_a = TaskRunner(store_a, first, ProgressHub(store_a), renew_interval=0.05)
    sid = await _finished_session(store_a)
    await finalize(store_a, runner_a, sid)
    await asyncio.wait_for(first.started.wait(), 5)

    # Another process whose clock is 31 s ahead: A's lease looks stale to it (A "hung").
    store_b = FileSystemStore(root, clock=lambda: time.time() + 31)
    second = BlockingHandoff("B")
    runner_b = TaskRunner(store_b, second, ProgressHub(store_b), renew_interval=0.05)
    await recover_once(store_b, runner_b)
    await asyncio.wait_for(second.started.wait(), 5)

    # A's next renewal finds the lease taken and cancels A's hand-off.
    await asyncio.wait_for(first.cancelled.wait(), 5)
    first.finish.set()  # had it not been cancelled, A would now report and finish
    second.finish.set()
    for _ in range(200):
        task = (await store_a.state(sid)).task
        if task is not None and task.stage.is_final:
            break
        await asyncio.sleep(0.02)
    assert task is not None and task.stage is Stage.COMPLETE and task.message == "B"
    assert not any(step.message.startswith("A: still") for step in task.history)
    await asyncio.sleep(0.2)  # nothing of A's lands afterwards either
    assert (await store_a.state(sid)).task == task
    await runner_a.close()
    await runner_b.close()


async def _pre_claimed(client, name: str) -> str:
    """A session uploaded whole, whose hand-off step ``name`` was claimed by a process that died
    before it recorded anything (the window between the claim and the identifier)."""
    sid = await upload_all(client, "speech.ogg", OGG, 4096)
    assert await client.server.app[STORE].claim_once(sid, name)
    return sid


async def _finished_status(client, sid: str) -> dict:
    resp = await client.post(f"/upload/chunked/{sid}/finalize")
    assert resp.status == 200, await resp.text()
    for _ in range(250):
        doc = await (await client.get(f"/upload/chunked/{sid}/status")).json()
        if doc.get("task", {}).get("stage") in ("complete", "failed"):
            return doc
        await asyncio.sleep(0.02)
    raise AssertionError(f"the task did not finish: {doc}")


async def test_an_interrupted_submission_is_never_sent_again(aiohttp_client, double_url, tmp_path):
    double = WhisperXDouble()
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=await double_url(double))
    sid = await _pre_claimed(client, "submit")
    doc = await _finished_status(client, sid)
    assert double.posts == 0  # the service was never sent the file a second time
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "submission_interrupted"
    assert doc["task"]["error"]["error_code"] == "submission_interrupted"


async def test_an_interrupted_command_is_never_run_again(aiohttp_client, tmp_path):
    ran = tmp_path / "ran"
    script = tmp_path / "mark.py"
    script.write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="command",
                                 handoff_command=f"{sys.executable} {script}")
    sid = await _pre_claimed(client, "run")
    doc = await _finished_status(client, sid)
    assert not ran.exists()
    assert doc["status"] == "failed" and doc["error"]["code"] == "interrupted"


async def test_a_failed_handoff_is_failed_in_status(aiohttp_client, tmp_path):
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="command",
                                 handoff_command=f"{sys.executable} -c 'raise SystemExit(4)'")
    sid = await upload_all(client, "speech.ogg", OGG, 4096)
    doc = await _finished_status(client, sid)
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "command_failed" and "status 4" in doc["error"]["message"]


async def test_chunkd_retry_frees_the_handoffs_once_claims(aiohttp_client, tmp_path):
    """`chunkd retry` (a separate process) queues a failed task again and frees the hand-off's
    one-time claim, so the command runs once more and the running server finishes it."""
    ok = tmp_path / "ok"
    script = tmp_path / "flaky.py"
    script.write_text(f"import os, sys\nsys.exit(0 if os.path.exists({str(ok)!r}) else 3)\n")
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="command",
                                 handoff_command=f"{sys.executable} {script}")
    sid = await upload_all(client, "speech.ogg", OGG, 4096)
    first = await _finished_status(client, sid)
    assert first["status"] == "failed" and first["error"]["code"] == "command_failed"
    ok.write_text("")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chunkd", "retry", first["task_id"],
        "--data-dir", str(tmp_path / "data"), stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and b"attempt 2" in out, out
    for _ in range(300):  # recovery adopts it within its 5 s rescan
        doc = await (await client.get(f"/upload/chunked/{sid}/status")).json()
        if doc["status"] in ("completed", "failed"):
            break
        await asyncio.sleep(0.05)
    assert doc["status"] == "completed", doc
    assert doc["task"]["attempt"] == 2
