"""Built-in inference: a static-KV-cache engine with continuous batching, registered as the
`inference_engine` plugin "static_kv"; `scripts/generate.py` and `scripts/serve.py` use it."""

from plugins.inference import engine  # noqa: F401 - registers "static_kv"
