"""Typed application state (aiohttp ``AppKey``s), in one place so modules need not import app."""

from aiohttp import web

from chunkd.api.body import BodySlots
from chunkd.api.ws_proxy import Relay
from chunkd.auth import Authenticator
from chunkd.config import Config
from chunkd.core.quotas import Quotas
from chunkd.core.tasks import TaskRunner
from chunkd.drain import Drain
from chunkd.progress import ProgressHub
from chunkd.store.base import SessionStore

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", SessionStore)
HUB = web.AppKey("hub", ProgressHub)
RUNNER = web.AppKey("runner", TaskRunner)
DRAIN = web.AppKey("drain", Drain)
#: The WhisperX service's WebSocket base URL, when ``/ws/tasks/{id}`` for unknown ids is relayed.
SERVICE_WS = web.AppKey("service_ws", str)
#: The relayed socket pairs that are open (closed with GOING_AWAY at shutdown).
RELAYS = web.AppKey("relays", set[Relay])
#: Who is asking (absent when auth is off).
AUTH = web.AppKey("auth", Authenticator)
#: The quotas on new sessions.
QUOTAS = web.AppKey("quotas", Quotas)
#: The chunk bodies being read (a bound on memory).
BODY_SLOTS = web.AppKey("body_slots", BodySlots)
