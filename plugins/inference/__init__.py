"""Built-in inference engine: static KV cache, batching, an HTTP server (work in progress)."""
