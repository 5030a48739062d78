"""Emulator of TabbyAPI's HTTP API for hosts without a GPU.

Nothing here runs a model: loading sleeps per "module" and generation produces deterministic
words. What is reproduced is the part of TabbyAPI that deployment code depends on: the
config.yml keys, the start-up order (port check with the port+1 fallback, startup model load,
api_tokens.yml generation, only then the HTTP port), the auth headers, the admin load/unload API
with its SSE progress stream, and the OpenAI-compatible completion endpoints.
"""

__version__ = "0.3.0"
