"""tuspyserver under uvicorn, storing into a given folder: the Python peer chunkd is compared to.

    benchmarks/.peers/py/bin/python benchmarks/peer_servers/tus_py_app.py DATA_DIR

Listens on 127.0.0.1 and a free port; the first stdout line is
``tuspyserver VERSION listening on http://127.0.0.1:PORT`` (tus endpoint: ``/files/``).
One uvicorn process (uvloop + httptools when installed, as with ``uvicorn[standard]``),
the library's defaults otherwise: the local-filesystem store, no completion hook.
"""

import socket
import sys
from importlib.metadata import version

import uvicorn
from fastapi import FastAPI
from tuspyserver import create_tus_router

files_dir = sys.argv[1]
app = FastAPI()
app.include_router(create_tus_router(prefix="files", files_dir=files_dir, max_size=64 * 1024**3))

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
sock.listen(2048)  # connections queue from here on, so the line below is true
port = sock.getsockname()[1]
print(f"tuspyserver {version('tuspyserver')} listening on http://127.0.0.1:{port}", flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
