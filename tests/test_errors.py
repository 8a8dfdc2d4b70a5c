"""The error table is the one place codes are declared, and the docs list every HTTP code."""

from __future__ import annotations

import re
from pathlib import Path

from chunkd import errors as E

ROOT = Path(__file__).resolve().parent.parent


def test_every_code_is_declared_once_and_raised_from_the_table():
    codes = [e.code for e in E.TABLE.values()]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", c) for c in codes)
    assert {401, 403} <= {e.status for e in E.TABLE.values()}
    # No raise site spells a code or builds an error by hand outside errors.py.
    offenders = []
    for path in (ROOT / "chunkd").rglob("*.py"):
        if path.name == "errors.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r'\bcode="|HandoffFailed\("|ChunkdError\("', line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_api_docs_list_every_http_code():
    api = (ROOT / "docs" / "API.md").read_text()
    missing = [e.code for e in E.TABLE.values() if f"`{e.code}`" not in api]
    assert missing == []


def test_a_template_is_filled_from_the_details():
    err = E.CHUNKS_MISSING(missing_count=2, total_chunks=10, missing_chunks=[4, 7])
    assert (err.status, err.code, err.message) == (409, "chunks_missing", "2 of 10 chunks are missing")
    assert err.to_json() == {"error": {"code": "chunks_missing", "message": err.message,
                                       "missing_count": 2, "total_chunks": 10,
                                       "missing_chunks": [4, 7]}}
    again = E.ChunkdError.from_record(err.to_record())
    assert (again.status, again.to_json()) == (409, err.to_json())
