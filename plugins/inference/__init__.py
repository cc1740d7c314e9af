"""Built-in inference: a paged-KV-cache engine with continuous batching, registered as the
`inference_engine` plugin "paged_kv"; `scripts/generate.py` and `scripts/serve.py` use it."""

from plugins.inference import engine  # noqa: F401 - registers "paged_kv"
