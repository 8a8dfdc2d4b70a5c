"""HTTP and WebSocket handlers: parse, call the store, map errors to responses."""
