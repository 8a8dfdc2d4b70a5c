"""Config: flag beats environment beats default; bad values stop the server with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chunkd.config import Config, ConfigError, GiB, MiB, load_config


def test_defaults():
    c = load_config({}, env={})
    assert c.host == "127.0.0.1"
    assert c.port == 8080
    assert c.data_dir == Path("./data")
    assert c.chunk_size == 50 * MiB
    assert c.max_chunk_size == 95 * MiB
    assert c.max_file_size == 50 * GiB
    assert c.session_ttl == 24 * 3600
    assert c.durable is True
    assert "mp3" in c.allowed_extensions and "wav" in c.allowed_extensions


def test_env_then_flag_precedence():
    env = {"CHUNKD_PORT": "9000", "CHUNKD_CHUNK_SIZE": "8MiB", "CHUNKD_DURABLE": "off"}
    c = load_config({}, env=env)
    assert (c.port, c.chunk_size, c.durable) == (9000, 8 * MiB, False)
    c = load_config({"port": "9001", "chunk_size": None}, env=env)
    assert (c.port, c.chunk_size) == (9001, 8 * MiB)


def test_units():
    c = load_config({"session_ttl": "30m", "max_file_size": "2GB", "allowed_extensions": ".WAV, mp3"},
                    env={})
    assert c.session_ttl == 1800
    assert c.max_file_size == 2_000_000_000
    assert c.allowed_extensions == frozenset({"wav", "mp3"})


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"max_chunk_size": "100MB"}, "Cloudflare"),
        ({"chunk_size": "96MiB"}, "chunk size"),
        ({"port": "70000"}, "port"),
        ({"port": "http"}, "--port"),
        ({"session_ttl": "soon"}, "--session-ttl"),
        ({"durable": "maybe"}, "--durable"),
        ({"allowed_extensions": "../x"}, "extension"),
    ],
)
def test_bad_values_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(flags, env={})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().port = 1  # type: ignore[misc]


def test_cli_reports_a_bad_value_without_a_trace(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "chunkd", "serve", "--data-dir", str(tmp_path), "--max-chunk-size",
         "200MiB"], capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("chunkd: error: max chunk size")
    assert "Traceback" not in proc.stderr


def test_serve_prints_where_and_limits(server_factory, tmp_path):
    srv = server_factory("--chunk-size", "8MiB", env={"CHUNKD_MAX_FILE_SIZE": "3GiB"})
    text = "\n".join(srv.banner)
    assert srv.url.startswith("http://127.0.0.1:")
    assert str((tmp_path / "data").resolve()) in text
    assert "8 MiB offered, 1 KiB min, 95 MiB max" in text
    assert "3 GiB max" in text
    assert "fdatasync every chunk" in text


def test_port_in_use_is_one_line(server_factory, tmp_path):
    srv = server_factory()
    port = srv.url.rsplit(":", 1)[1]
    proc = subprocess.run(
        [sys.executable, "-m", "chunkd", "serve", "--port", port, "--data-dir", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
