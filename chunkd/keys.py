"""Typed application state (aiohttp ``AppKey``s), in one place so modules need not import app."""

from aiohttp import web

from chunkd.config import Config
from chunkd.drain import Drain
from chunkd.handoff.base import Handoff
from chunkd.store.filesystem import FileSystemStore

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", FileSystemStore)
HANDOFF = web.AppKey("handoff", Handoff)
DRAIN = web.AppKey("drain", Drain)
