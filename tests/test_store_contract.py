"""The store contract: what every session-store backend must do, checked through the protocols of
``chunkd.store.base`` alone (no paths, no backend internals).

    store_factory         one fixture param per backend ("fs" now; S3 later): ``open_store()``
                          opens another instance on the same backing storage (a restart, or a
                          second chunkd process); ``fresh()`` gives brand-new backing storage
    StoreMachine          Hypothesis state machine: random creates, chunk puts (good, short, long,
                          corrupt, repeated; bytes handed over or written into lent buffers),
                          claims, removals, restarts, blob reads and purges, through two store
                          instances at once; after every step both agree with a plain
                          in-memory model (get, state, resolve, scan)
    test_*                what a sequential machine expresses poorly: concurrent writers of one
                          chunk, races for a claim, a chunk counted after its session ended,
                          once-claims and leases across instances (and a clock 31 s ahead),
                          task records, refused files, expiry by ttl, big chunks, moving a blob

A second backend joins by adding an entry to ``BACKENDS``; nothing else here changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from chunkd.errors import UNSUPPORTED_CONTENT, ChunkdError
from chunkd.model.session import Claim, EndKind, Phase, SessionMeta
from chunkd.model.task import Stage, Task
from chunkd.store.base import (
    LEASE_STALE_SECONDS,
    LeaseLost,
    Movable,
    RangeWriter,
    SessionStore,
)

Clock = Callable[[], float]
OpenStore = Callable[..., SessionStore]


# -- backends ------------------------------------------------------------------------------------


def _fs_storage(tmp_path_factory: pytest.TempPathFactory) -> OpenStore:
    """New backing storage for the file-system store: an empty folder of its own."""
    from chunkd.store import FileSystemStore

    root: Path = tmp_path_factory.mktemp("fs-store")

    def open_store(*, clock: Clock = time.time) -> SessionStore:
        return FileSystemStore(root, durable=True, clock=clock)

    return open_store


#: name -> a function making new, empty backing storage and returning how to open a store on it.
BACKENDS: dict[str, Callable[[pytest.TempPathFactory], OpenStore]] = {"fs": _fs_storage}


class StoreFactory:
    """Opens store instances on one backing storage: ``factory()`` (optionally with a ``clock``)
    is another instance on the same data, as after a restart or in another process."""

    #: The stores are opened in durable mode: a committed range is on stable storage.
    durable = True

    def __init__(self, new_storage: Callable[[], OpenStore]) -> None:
        self._new_storage = new_storage
        self._open = new_storage()

    def __call__(self, *, clock: Clock = time.time) -> SessionStore:
        return self._open(clock=clock)

    def fresh(self) -> StoreFactory:
        """The same backend on new, empty backing storage (one per Hypothesis example)."""
        return StoreFactory(self._new_storage)


@pytest.fixture(params=sorted(BACKENDS))
def store_factory(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> StoreFactory:
    make = BACKENDS[request.param]
    return StoreFactory(lambda: make(tmp_path_factory))


# -- helpers ---------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: The code ``get`` answers with once a session ended this way (both 410).
GONE_CODE = {EndKind.ABORT: "session_aborted", EndKind.EXPIRE: "session_expired"}

FILENAMES = [("rec.wav", "wav"), ("Aufnahme äöü 1.mp3", "mp3"), ("a.b.flac", "flac")]
TASK_PARAMS: list[dict[str, Any]] = [{}, {"diarize": True, "speakers": 2, "prompt": "ß"}]


def part_size(store: SessionStore, wanted: int) -> int:
    """``wanted``, within the parts the backend takes."""
    return min(max(wanted, store.limits.min_part_size, 1), store.limits.max_part_size)


async def create(store: SessionStore, total_size: int, chunk_size: int, *, ttl: float = 3600,
                 filename: tuple[str, str] = FILENAMES[0], language: str | None = None,
                 model: str | None = None, task_params: dict[str, Any] | None = None
                 ) -> SessionMeta:
    total_chunks = -(-total_size // chunk_size)
    params = dict(task_params or {})
    meta = await store.create(
        ttl=ttl, filename=filename[0], extension=filename[1], total_size=total_size,
        chunk_size=chunk_size, total_chunks=total_chunks, language=language, model=model,
        task_params=dict(params),
    )
    assert (meta.filename, meta.extension, meta.total_size, meta.chunk_size, meta.total_chunks,
            meta.language, meta.model, meta.task_params) == (
        filename[0], filename[1], total_size, chunk_size, total_chunks, language, model, params)
    assert meta.expires_at - meta.created_at == pytest.approx(ttl)
    return meta


#: Pieces per range (or blob stream) at most (the last one takes the rest): bounded work for big
#: chunks, also while Hypothesis shrinks piece sizes towards 1 byte.
MAX_PIECES = 64


async def write_range(writer: RangeWriter, body: bytes, via: str, pieces: list[int]) -> None:
    """Write ``body`` in pieces of the given sizes (cycled): handed over with ``write``, or copied
    into the buffers the writer lends (``buffer`` + ``filled``)."""
    pos = 0
    turn = 0
    while pos < len(body):
        n = len(body) - pos
        if turn < MAX_PIECES - 1:
            n = min(pieces[turn % len(pieces)], n)
        turn += 1
        if via == "write":
            await writer.write(body[pos:pos + n])
        else:
            buf = writer.buffer()
            assert len(buf) > 0, "buffer() is empty while the range has room"
            n = min(n, len(buf))
            buf[:n] = body[pos:pos + n]
            await writer.filled(n)
        pos += n
        assert writer.written == pos


async def put_good(store: SessionStore, meta: SessionMeta, data: bytes, index: int,
                   *, hashed: bool = True) -> str | None:
    """Write chunk ``index`` whole and count it; its digest (None when not hashed)."""
    chunk = data[meta.chunk_offset(index):meta.chunk_offset(index) + meta.chunk_length(index)]
    async with store.open_chunk(meta, index, hashed=hashed) as slot:
        assert slot.counted is None
        await slot.writer.write(chunk)
        digest = await slot.writer.commit()
        if hashed:
            assert digest == sha256(chunk)
        await slot.count(digest if hashed else None)
    return digest if hashed else None


async def put_all(store: SessionStore, meta: SessionMeta, data: bytes) -> None:
    for index in range(meta.total_chunks):
        await put_good(store, meta, data, index)


async def finalized(store: SessionStore, size: int = 100
                    ) -> tuple[SessionMeta, Claim, bytes]:
    """A whole session whose finalize was claimed, and its bytes."""
    chunk = part_size(store, 40)
    meta = await create(store, max(size, chunk + 1), chunk)
    data = random.Random(5).randbytes(meta.total_size)
    await put_all(store, meta, data)
    claim = await store.claim_end(meta.session_id, EndKind.FINALIZE)
    assert claim.won and claim.task_id
    return meta, claim, data


def _claim_key(claim: Claim | None) -> tuple[EndKind, str | None] | None:
    return None if claim is None else (claim.kind, claim.task_id)


# -- the model -------------------------------------------------------------------------------------


@dataclass
class ModelSession:
    meta: SessionMeta
    data: bytes
    received: set[int] = field(default_factory=set)
    #: What ``slot.counted`` must say of a counted chunk: the digest it was counted with, or "".
    digests: dict[int, str] = field(default_factory=dict)
    claim: Claim | None = None  # the winning claim
    removed: bool = False

    def chunk(self, index: int) -> bytes:
        start = self.meta.chunk_offset(index)
        return self.data[start:start + self.meta.chunk_length(index)]

    @property
    def complete(self) -> bool:
        return len(self.received) == self.meta.total_chunks

    @property
    def gone(self) -> bool:
        """get() answers 410: removed, or aborted / expired."""
        return self.removed or (self.claim is not None and self.claim.kind != EndKind.FINALIZE)

    @property
    def phase(self) -> Phase:
        if self.claim is not None and self.claim.kind == EndKind.FINALIZE:
            return Phase.FINALIZING
        return Phase.RECEIVED if self.complete else Phase.UPLOADING


#: Sizes of the pieces a chunk is written in (cycled).
pieces_st = st.lists(st.one_of(st.integers(1, 4096), st.integers(4097, 1 << 19)),
                     min_size=1, max_size=4)


class StoreMachine(RuleBasedStateMachine):
    """One backing storage per example, shared by two live store instances (two processes, in
    effect): the rules use the current one (``switch`` changes it, ``reopen`` replaces it with a
    new instance, as a restart would) and the invariant is checked through both."""

    sessions = Bundle("sessions")

    def __init__(self, factory: StoreFactory) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.durable = factory.durable
        self.open_store = factory.fresh()
        self.stores = [self.open_store(), self.open_store()]
        self.current = 0
        self.model: dict[str, ModelSession] = {}
        self.unknown = str(uuid.uuid4())

    @property
    def store(self) -> SessionStore:
        return self.stores[self.current]

    def run(self, aw: Any) -> Any:
        return self.loop.run_until_complete(aw)

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    # -- rules -----------------------------------------------------------------------------------

    @rule(target=sessions, extra=st.one_of(st.integers(0, 40), st.integers(1 << 18, 3 << 19)),
          chunks=st.integers(1, 4),
          tail=st.integers(0, 1000), seed=st.integers(0, 2**16),
          filename=st.sampled_from(FILENAMES), language=st.sampled_from([None, "de"]),
          model=st.sampled_from([None, "large-v3"]), params=st.sampled_from(TASK_PARAMS))
    def create(self, extra: int, chunks: int, tail: int, seed: int, filename: tuple[str, str],
               language: str | None, model: str | None, params: dict[str, Any]) -> str:
        limits = self.store.limits
        chunk = part_size(self.store, limits.min_part_size + extra)
        chunks = min(chunks, limits.max_parts)
        total_size = (chunks - 1) * chunk + 1 + tail % chunk
        meta = self.run(create(self.store, total_size, chunk, filename=filename,
                               language=language, model=model, task_params=params))
        sid = meta.session_id
        assert sid not in self.model and sid not in self._task_ids()
        self.model[sid] = ModelSession(meta, random.Random(seed).randbytes(total_size))
        return sid

    @rule(sid=sessions, index=st.integers(0, 3), repeat=st.booleans(), hashed=st.booleans(),
          via=st.sampled_from(["write", "buffer"]), pieces=pieces_st)
    def put(self, sid: str, index: int, repeat: bool, hashed: bool, via: str, pieces: list[int]
            ) -> None:
        """A whole chunk, or (``repeat``) one counted already, which is not written again."""
        s = self.model[sid]
        index %= s.meta.total_chunks
        if repeat and s.received:
            index = sorted(s.received)[index % len(s.received)]
        self.run(self._put(s, index, "good", hashed, via, pieces, 0, False))

    @rule(sid=sessions, index=st.integers(0, 3), mode=st.sampled_from(["short", "long", "corrupt"]),
          hashed=st.booleans(), via=st.sampled_from(["write", "buffer"]), pieces=pieces_st,
          cut=st.integers(0, 10**4), flag=st.booleans())
    def put_bad(self, sid: str, index: int, mode: str, hashed: bool, via: str, pieces: list[int],
                cut: int, flag: bool) -> None:
        """A chunk that must count nothing: short (the caller leaves without counting, after a
        commit or not), long (the write past the end fails) or corrupt (its digest differs)."""
        s = self.model[sid]
        self.run(self._put(s, index % s.meta.total_chunks, mode, hashed, via, pieces, cut, flag))

    @rule(sid=sessions, hashed=st.booleans(), via=st.sampled_from(["write", "buffer"]),
          pieces=pieces_st)
    def fill(self, sid: str, hashed: bool, via: str, pieces: list[int]) -> None:
        """Every missing chunk, good (to reach whole sessions often)."""
        s = self.model[sid]
        if s.claim is not None or s.removed:
            return
        for index in range(s.meta.total_chunks):
            if index not in s.received:
                self.run(self._put(s, index, "good", hashed, via, pieces, 0, False))

    @rule()
    def reopen(self) -> None:
        self.stores[self.current] = self.open_store()

    @rule()
    def switch(self) -> None:
        self.current = 1 - self.current

    @rule(sid=sessions)
    def finalize(self, sid: str) -> None:
        self._claim(sid, EndKind.FINALIZE)

    @rule(sid=sessions, kind=st.sampled_from([EndKind.ABORT, EndKind.EXPIRE]))
    def end(self, sid: str, kind: EndKind) -> None:
        self._claim(sid, kind)

    def _claim(self, sid: str, kind: EndKind) -> None:
        s = self.model[sid]
        if s.removed:
            return
        claim = self.run(self.store.claim_end(sid, kind))
        event(f"claim_end {kind}: {'won' if s.claim is None else 'lost'}")
        if s.claim is None:
            assert claim.won is True
            assert claim.kind == kind
            if kind == EndKind.FINALIZE:
                assert claim.task_id, "a finalize claim carries a task id"
                assert claim.task_id not in self._task_ids() and claim.task_id not in self.model
            s.claim = claim
        else:
            assert claim.won is False, "only the first claim wins"
            assert (claim.kind, claim.task_id, claim.claimed_at) == (
                s.claim.kind, s.claim.task_id, s.claim.claimed_at), "a later claim differs"

    @rule(sid=sessions, reason=st.sampled_from(list(EndKind)), twice=st.booleans())
    def remove(self, sid: str, reason: EndKind, twice: bool) -> None:
        s = self.model[sid]
        if s.claim is None:
            return
        event("remove")
        self.run(self.store.remove(sid, reason))
        if twice:
            self.run(self.store.remove(sid, reason))
        s.removed = True

    @rule(sid=sessions, cut=st.integers(0, 10**4), piece=st.integers(64, 1 << 16))
    def read_blob(self, sid: str, cut: int, piece: int) -> None:
        s = self.model[sid]
        if not s.complete or s.gone:
            return
        event("blob read")
        self.run(self._read_blob(s, cut, piece))

    @rule()
    def purge(self) -> None:
        """Housekeeping now changes nothing a caller sees (tombstones and task ids are younger
        than a week)."""
        self.run(self.store.purge(time.time()))

    # -- the invariant ---------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        for store in self.stores:
            self.run(self._agrees(store))

    async def _agrees(self, store: SessionStore) -> None:
        for sid, s in self.model.items():
            assert await store.resolve(sid) == sid
            if s.claim is not None and s.claim.kind == EndKind.FINALIZE:
                assert await store.resolve(s.claim.task_id) == sid
            if s.gone:
                for call in (store.get, store.state):
                    with pytest.raises(ChunkdError) as raised:
                        await call(sid)
                    assert raised.value.status == 410, (call.__name__, raised.value.code)
                    if not s.removed:
                        assert s.claim is not None
                        assert raised.value.code == GONE_CODE[s.claim.kind]
                continue
            assert await store.get(sid) == s.meta
            state = await store.state(sid)
            assert state.meta == s.meta
            assert state.received == frozenset(s.received)
            assert state.received_bytes == sum(len(s.chunk(i)) for i in s.received)
            assert state.missing == [i for i in range(s.meta.total_chunks) if i not in s.received]
            assert state.phase == s.phase
            if s.claim is None:
                assert state.claim is None
            else:
                assert state.claim is not None
                assert (state.claim.kind, state.claim.task_id, state.claim.claimed_at) == (
                    s.claim.kind, s.claim.task_id, s.claim.claimed_at)
                assert state.task_id == s.claim.task_id
            assert state.task is None and state.failure is None
            assert state.writing is False, "no chunk is being written between steps"
        # scan: every session not removed, claimed ones included
        states = await store.scan()
        by_id = {state.meta.session_id: state for state in states}
        assert len(by_id) == len(states), "scan lists a session twice"
        assert set(by_id) == {sid for sid, s in self.model.items() if not s.removed}
        for sid, state in by_id.items():
            s = self.model[sid]
            assert state.meta == s.meta
            assert state.received == frozenset(s.received)
            assert _claim_key(state.claim) == _claim_key(s.claim)
        with pytest.raises(ChunkdError) as raised:
            await store.get(self.unknown)
        assert (raised.value.status, raised.value.code) == (404, "session_not_found")
        assert await store.resolve(self.unknown) == self.unknown

    # -- steps -----------------------------------------------------------------------------------

    async def _put(self, s: ModelSession, index: int, mode: str, hashed: bool, via: str,
                   pieces: list[int], cut: int, flag: bool) -> None:
        meta = s.meta
        if s.gone or s.claim is not None:
            with pytest.raises(ChunkdError) as raised:
                async with self.store.open_chunk(meta, index, hashed=hashed):
                    pass
            err = raised.value
            event(f"put refused: {err.code}")
            if s.removed:
                assert err.status in (409, 410), err.code
            elif s.claim is not None and s.claim.kind == EndKind.FINALIZE:
                assert err.code == "session_finalized", err.code
            else:
                assert err.status == 410, err.code
            return
        good = s.chunk(index)
        if mode == "corrupt":
            hashed = True
        async with self.store.open_chunk(meta, index, hashed=hashed) as slot:
            if index in s.received:  # repeat: nothing is written
                event("put: repeat")
                assert slot.counted == s.digests[index]
                return
            event(f"put: {mode} via {via}" if mode != "long" else "put: long")
            assert slot.counted is None
            writer = slot.writer
            assert writer.written == 0
            if mode == "long":
                extra = bytes(1 + cut % 7)
                with pytest.raises(ValueError):
                    if flag:
                        await writer.write(good)
                        await writer.write(extra)
                    else:
                        await writer.write(good + extra)
                return  # counts nothing
            body = good
            if mode == "short":
                body = good[:cut % len(good)]
            elif mode == "corrupt":
                at = cut % len(good)
                body = good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:]
            await write_range(writer, body, via, pieces)
            if mode == "short" and flag:
                return  # left without commit nor count
            digest = await writer.commit()
            assert writer.written == len(body)
            if self.durable:
                assert writer.durable_bytes == len(body)
            if hashed:
                assert digest == sha256(body)
            if mode == "corrupt":
                assert digest != sha256(good)
            if mode != "good":
                return  # short or corrupt: left without count
            stored = digest if hashed else None
            counted = await slot.count(stored)
            s.received.add(index)
            s.digests[index] = stored or ""
            assert counted == frozenset(s.received)
        other = self.stores[1 - self.current]  # another process sees it counted, at once
        async with other.open_chunk(meta, index, hashed=hashed) as again:
            assert again.counted == s.digests[index]
        if s.complete:  # the last chunk came: the file is whole, every byte where it belongs
            blob = await self.store.blob(meta.session_id)
            assert blob is not None, "a whole session has its blob"
            assert await blob.read(0, blob.size) == s.data
            piece = max(pieces[0], blob.size // MAX_PIECES + 1)
            parts = [part async for part in blob.stream(piece)]
            assert all(0 < len(part) <= piece for part in parts)
            assert b"".join(parts) == s.data

    async def _read_blob(self, s: ModelSession, cut: int, piece: int) -> None:
        blob = await self.store.blob(s.meta.session_id)
        assert blob is not None, "a whole session has its blob"
        assert blob.size == s.meta.total_size
        assert await blob.read(0, blob.size) == s.data
        offset = cut % blob.size
        n = 1 + (cut // 7) % (blob.size - offset)
        assert await blob.read(offset, n) == s.data[offset:offset + n]
        piece = max(piece, blob.size // MAX_PIECES + 1)
        parts = [part async for part in blob.stream(piece)]
        assert all(0 < len(part) <= piece for part in parts)
        assert b"".join(parts) == s.data

    def _task_ids(self) -> set[str]:
        return {s.claim.task_id for s in self.model.values()
                if s.claim is not None and s.claim.task_id is not None}


MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=25, deadline=None,
                            database=None)


def test_store_agrees_with_a_model(store_factory: StoreFactory) -> None:
    run_state_machine_as_test(lambda: StoreMachine(store_factory), settings=MACHINE_SETTINGS)


# -- examples --------------------------------------------------------------------------------------


@pytest.mark.parametrize("second_instance", [False, True], ids=["same-store", "other-store"])
async def test_a_second_writer_of_a_chunk_waits_for_the_first(
    store_factory: StoreFactory, second_instance: bool
) -> None:
    """One holder per chunk (through the same instance or another one): the second waits, then
    finds the chunk counted with the first one's digest; another chunk is not held up."""
    store = store_factory()
    other = store_factory() if second_instance else store
    chunk = part_size(store, 64)
    meta = await create(store, 2 * chunk, chunk)
    data = random.Random(1).randbytes(meta.total_size)
    seen: list[str | None] = []

    async def second() -> None:
        async with other.open_chunk(meta, 0, hashed=True) as slot:
            seen.append(slot.counted)

    async with store.open_chunk(meta, 0, hashed=True) as first:
        assert first.counted is None
        assert (await store.state(meta.session_id)).writing is True
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        assert not waiter.done(), "a second holder of chunk 0 did not wait"
        async with asyncio.timeout(10):  # another chunk is not held: no wait
            async with other.open_chunk(meta, 1, hashed=True) as neighbour:
                assert neighbour.counted is None
        await first.writer.write(data[:chunk])
        digest = await first.writer.commit()
        assert digest == sha256(data[:chunk])
        assert await first.count(digest) == frozenset({0})
    async with asyncio.timeout(10):
        await waiter
    assert seen == [digest]
    assert (await store.state(meta.session_id)).writing is False
    assert (await store.state(meta.session_id)).received == frozenset({0})


async def test_one_claim_wins_a_race_of_instances(store_factory: StoreFactory) -> None:
    stores = [store_factory() for _ in range(6)]
    meta = await create(stores[0], 10, part_size(stores[0], 10))
    kinds = [EndKind.FINALIZE, EndKind.ABORT, EndKind.EXPIRE] * 2
    claims = await asyncio.gather(*(s.claim_end(meta.session_id, k)
                                     for s, k in zip(stores, kinds, strict=True)))
    winners = [c for c in claims if c.won]
    assert len(winners) == 1
    assert {(c.kind, c.task_id, c.claimed_at) for c in claims} == {
        (winners[0].kind, winners[0].task_id, winners[0].claimed_at)}
    again = await store_factory().claim_end(meta.session_id, EndKind.FINALIZE)
    assert not again.won and (again.kind, again.task_id) == (winners[0].kind, winners[0].task_id)


async def test_claim_once_is_true_once_across_instances(store_factory: StoreFactory) -> None:
    a, b = store_factory(), store_factory()
    meta, _, _ = await finalized(a)
    sid = meta.session_id
    assert await a.claim_once(sid, "submit") is True
    assert await b.claim_once(sid, "submit") is False
    assert await a.claim_once(sid, "submit") is False
    assert await b.claim_once(sid, "run") is True  # another name is claimed on its own
    assert await store_factory().claim_once(sid, "submit") is False  # after a restart too
    await b.release_once(sid, "submit")
    assert await a.claim_once(sid, "submit") is True
    assert await b.claim_once(sid, "submit") is False
    assert await a.claim_once(sid, "run") is False  # releasing one name left the other
    await a.release_once(sid, "run")
    racers = [store_factory() for _ in range(5)]
    results = await asyncio.gather(*(r.claim_once(sid, "run") for r in racers))
    assert results.count(True) == 1


async def test_leases_one_driver_and_takeover(store_factory: StoreFactory) -> None:
    """One live lease; a released one is taken at once, a silent one by a clock 31 s ahead, and
    the old holder's renew and writes fail from then on."""
    a, b = store_factory(), store_factory()
    meta, claim, _ = await finalized(a)
    sid = meta.session_id
    assert claim.task_id is not None
    task = Task.queued(claim.task_id, sid, "command", "audio/wav", time.time())

    la = await a.acquire(sid)
    assert la is not None and la.session_id == sid
    assert await b.acquire(sid) is None, "a live lease was taken"
    assert await a.renew(la) is True
    await a.write_task(task, la)
    await a.release(la)
    lb = await b.acquire(sid)
    assert lb is not None, "a released lease could not be acquired"
    assert await a.renew(la) is False
    with pytest.raises(LeaseLost):
        await a.write_task(task, la)

    ahead = store_factory(clock=lambda: time.time() + LEASE_STALE_SECONDS + 1)
    lc = await ahead.acquire(sid)
    assert lc is not None, "a lease not renewed for 31 s was not taken over"
    assert await b.renew(lb) is False
    with pytest.raises(LeaseLost):
        await b.write_task(task, lb)
    with pytest.raises(LeaseLost):
        await b.write_result(sid, {"text": "stale"}, lb)
    assert await a.acquire(sid) is None  # the new holder's lease is live
    moved = task.with_step(Stage.TRANSCRIBING, 10, "transcribing", time.time())
    await ahead.write_task(moved, lc)
    assert (await b.state(sid)).task == moved


async def test_task_record_round_trip(store_factory: StoreFactory) -> None:
    store = store_factory()
    meta, claim, _ = await finalized(store)
    sid = meta.session_id
    assert claim.task_id is not None
    lease = await store.acquire(sid)
    assert lease is not None
    now = time.time()
    task = (Task.queued(claim.task_id, sid, "whisperx", "audio/wav", now)
            .with_step(Stage.TRANSCRIBING, 40, "Transkription läuft", now + 1.25)
            .remembering(now + 1.5, identifier="abc-123", polls=3))
    await store.write_task(task, lease)
    for s in (store, store_factory()):
        state = await s.state(sid)
        assert state.task == task
        assert state.phase == Phase.PROCESSING
    result = {"segments": [{"start": 0.0, "end": 1.5, "text": "hallo"}], "language": "de"}
    await store.write_result(sid, result, lease)
    done = task.completed(now + 2, message="done", location=None, has_result=True)
    await store.write_task(done, lease)
    reopened = store_factory()
    state = await reopened.state(sid)
    assert state.task == done
    assert state.phase == Phase.COMPLETED and state.finished
    assert await reopened.read_result(sid) == result
    failed = done.failed({"error_code": "transcription_failed", "user_message": "no",
                          "technical_detail": "stderr"}, now + 3)
    await store.write_task(failed, lease)
    state = await store_factory().state(sid)
    assert state.task == failed and state.phase == Phase.FAILED
    assert state.error == {"code": "transcription_failed", "message": "no"}


async def test_record_failure_keeps_why_and_drops_the_bytes(store_factory: StoreFactory) -> None:
    store = store_factory()
    meta, _, _ = await finalized(store)
    sid = meta.session_id
    assert await store.blob(sid) is not None
    error = UNSUPPORTED_CONTENT(detected_type="text/plain")
    await store.record_failure(sid, error)
    for s in (store, store_factory()):
        state = await s.state(sid)
        assert state.failure == error.to_record()
        assert state.phase == Phase.FAILED and state.finished
        assert state.error == {"code": "unsupported_content", "message": error.message,
                               "detected_type": "text/plain"}
        assert await s.blob(sid) is None


async def test_unknown_and_malformed_ids(store_factory: StoreFactory) -> None:
    store = store_factory()
    assert await store.health() == "ok"
    unknown = str(uuid.uuid4())
    for call in (store.get, store.state):
        with pytest.raises(ChunkdError) as raised:
            await call(unknown)
        assert (raised.value.status, raised.value.code) == (404, "session_not_found")
    assert await store.resolve(unknown) == unknown
    for bad in ("", "not-a-session", "../" + unknown, unknown.upper() + "x"):
        with pytest.raises(ChunkdError) as raised:
            await store.get(bad)
        assert (raised.value.status, raised.value.code) == (404, "session_not_found"), bad
        with pytest.raises(ChunkdError) as raised:
            await store.resolve(bad)
        assert raised.value.code == "session_not_found", bad


@pytest.mark.parametrize("via", ["write", "buffer"])
async def test_big_chunks_in_odd_pieces(store_factory: StoreFactory, via: str) -> None:
    """Chunks of megabytes (more than any sane internal batch), written in uneven pieces."""
    store = store_factory()
    chunk = part_size(store, (3 << 20) + 17)
    meta = await create(store, 2 * chunk - 1000, chunk)
    data = random.Random(7).randbytes(meta.total_size)
    for index in range(meta.total_chunks):
        body = data[meta.chunk_offset(index):meta.chunk_offset(index) + meta.chunk_length(index)]
        async with store.open_chunk(meta, index, hashed=True) as slot:
            await write_range(slot.writer, body, via, [1, 65537, 300_001, 7, 1 << 20])
            digest = await slot.writer.commit()
            assert digest == sha256(body)
            assert slot.writer.durable_bytes == len(body)
            await slot.count(digest)
    blob = await store_factory().blob(meta.session_id)
    assert blob is not None and blob.size == meta.total_size
    assert await blob.read(0, blob.size) == data
    assert b"".join([part async for part in blob.stream()]) == data


@pytest.mark.parametrize("end", ["finalize", "abort", "expire", "remove"])
async def test_count_fails_when_the_session_ended_meanwhile(store_factory: StoreFactory,
                                                           end: str) -> None:
    """The end is claimed (or the session removed) by another instance while a chunk is being
    written: counting it then fails, and it is not counted."""
    store, other = store_factory(), store_factory()
    chunk = part_size(store, 64)
    meta = await create(store, 2 * chunk, chunk)
    sid = meta.session_id
    async with store.open_chunk(meta, 0, hashed=True) as slot:
        await slot.writer.write(bytes(chunk))
        digest = await slot.writer.commit()
        if end == "remove":
            await other.claim_end(sid, EndKind.ABORT)
            await other.remove(sid, EndKind.ABORT)
        else:
            await other.claim_end(sid, EndKind(end))
        with pytest.raises(ChunkdError) as raised:
            await slot.count(digest)
    if end == "finalize":
        assert raised.value.code == "session_finalized"
        assert (await store_factory().state(sid)).received == frozenset()
    else:
        assert raised.value.status == 410, raised.value.code


async def test_a_session_past_its_ttl_takes_no_chunks(store_factory: StoreFactory) -> None:
    """Past ``expires_at`` (by the store's clock) and not finalized, ``get`` says 410
    ``session_expired`` before any sweeper claimed the end, and ``open_chunk`` says the same
    (its contract: "404/410 as Sessions.get")."""
    store = store_factory()
    chunk = part_size(store, 64)
    meta = await create(store, 2 * chunk, chunk, ttl=60)
    late = store_factory(clock=lambda: time.time() + 120)
    for call in (late.get, late.state):
        with pytest.raises(ChunkdError) as raised:
            await call(meta.session_id)
        assert (raised.value.status, raised.value.code) == (410, "session_expired")
    with pytest.raises(ChunkdError) as raised:
        async with late.open_chunk(meta, 0, hashed=False) as slot:
            await slot.writer.write(bytes(chunk))
            await slot.writer.commit()
            await slot.count(None)
    assert (raised.value.status, raised.value.code) == (410, "session_expired")
    assert (await store.state(meta.session_id)).received == frozenset()


async def test_a_movable_blob_moves_once_and_is_gone(store_factory: StoreFactory,
                                                    tmp_path: Path) -> None:
    """A blob that can be moved (same file system) is moved whole, idempotently, and the session
    has no blob afterwards; any blob streams the whole file."""
    store = store_factory()
    meta, _, data = await finalized(store, size=5000)
    blob = await store.blob(meta.session_id)
    assert blob is not None
    parts = [part async for part in blob.stream(999)]
    assert all(0 < len(part) <= 999 for part in parts) and b"".join(parts) == data
    if isinstance(blob, Movable):
        target = tmp_path / "moved.wav"
        await blob.move_to(target)
        await blob.move_to(target)  # again, as after a crash: done already
        assert target.read_bytes() == data
        assert await store.blob(meta.session_id) is None
        assert await store_factory().blob(meta.session_id) is None


async def test_housekeeping_keeps_what_is_still_in_use(store_factory: StoreFactory) -> None:
    """A purge a week later keeps a live session's task id resolvable; removing an id that
    never existed leaves it unknown (404, not 410); metadata is a copy of what was given."""
    store = store_factory()
    params: dict[str, Any] = {"a": [1]}
    meta = await create(store, 100, part_size(store, 100), task_params=params)
    params["a"].append(2)
    assert (await store.get(meta.session_id)).task_params == {"a": [1]}
    claim = await store.claim_end(meta.session_id, EndKind.FINALIZE)
    assert claim.task_id is not None
    await store.purge(time.time() + 8 * 86400)
    assert await store.resolve(claim.task_id) == meta.session_id
    unknown = str(uuid.uuid4())
    await store.remove(unknown, EndKind.ABORT)
    with pytest.raises(ChunkdError) as raised:
        await store.get(unknown)
    assert raised.value.status == 404
    with pytest.raises(ChunkdError) as raised:
        await store.claim_once(unknown, "submit")
    assert raised.value.status == 404
