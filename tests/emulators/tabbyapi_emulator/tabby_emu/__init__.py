"""Emulator of TabbyAPI's HTTP API for hosts without a GPU.

Nothing here runs a model: loading sleeps per "module" and generation produces deterministic
words. What is reproduced is the part of TabbyAPI that deployment code depends on: the
config.yml keys, the start-up order (port check with the port+1 fallback, startup model load,
api_tokens.yml generation, only then the HTTP port), the auth headers, the admin load/unload API
with its SSE progress stream, and the OpenAI-compatible completion endpoints. It plays one of the
two TabbyAPI generations the tabbyapi role pins (exl2-checkpoint or main, see generation.py) and
follows that commit's rules where they differ; README.md lists each behaviour with its source.
"""

__version__ = "0.4.0"
