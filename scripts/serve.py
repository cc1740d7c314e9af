#!/usr/bin/env python
"""Serve a checkpoint over an OpenAI-compatible HTTP API (completions and chat, streaming or not).

    python scripts/serve.py --checkpoint outputs/debug/checkpoints/step-200 --port 8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "def main(", "max_tokens": 32, "temperature": 0}'

The KV cache holds the model's context length per sequence: its training length, or what its RoPE
scaling reaches (the checkpoint's, or `--rope-scaling yarn --rope-factor 4` to extend it).

Binds 127.0.0.1 unless --host says otherwise; with --api-key, the /v1/ endpoints need
`Authorization: Bearer KEY`. Needs the `serve` extra: pip install -e '.[serve]'.

Started by torchrun, the model is split tensor-parallel over the processes; the first serves
HTTP and keeps the others in step (plugins/inference/lockstep.py):

    torchrun --standalone --nproc_per_node=2 scripts/serve.py --checkpoint PATH --port 8000
"""

import argparse
import logging
import sys

import torch.distributed as dist

from plugins.inference.cli import (
    add_model_arguments,
    check_sizes,
    engine_factory,
    load_from_args,
)
from plugins.inference.loading import LOAD_ERRORS
from plugins.inference.lockstep import LockstepEngine, follow
from plugins.inference.rope import context_length
from plugins.inference.tensor_parallel import exit_without_teardown, tensor_parallel_mesh


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/")
    parser.add_argument("--model-name", help="the id clients send as 'model' (default: arbor)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument(
        "--max-len",
        type=int,
        help="tokens per sequence, prompt + completion (default: the model's training length, "
        "or the length its RoPE scaling reaches: original length × factor)",
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        help="KV cache size, shared by all sequences in blocks handed out on demand (default: "
        "room for --max-batch sequences of --max-len tokens)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn

        from plugins.inference.server import ServerConfig, create_app
        from plugins.inference.service import EngineLoop
    except ImportError as err:
        print(f"serve.py: error: {err}; install with: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    mesh = tensor_parallel_mesh()
    try:
        make_engine = engine_factory(args.engine)
        loaded = load_from_args(args, mesh)
    except LOAD_ERRORS as err:
        print(f"serve.py: error: {err}", file=sys.stderr)
        return 2
    max_len = args.max_len or context_length(loaded.args)
    try:
        check_sizes(
            loaded.args,
            loaded.model.tok_embeddings.weight.dtype,
            loaded.model.tok_embeddings.weight.device,
            ("--max-batch", args.max_batch),
            ("--max-len", max_len),
            kv_cache_gib=args.kv_cache_gib,
        )
    except ValueError as err:
        print(f"serve.py: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    kv_cache = (
        {} if args.kv_cache_gib is None else {"kv_cache_bytes": int(args.kv_cache_gib * 2**30)}
    )
    engine = make_engine(
        loaded.model, loaded.tokenizer, args.max_batch, max_len, args.compile, **kv_cache
    )
    cache = f"KV cache {engine.forward.cache.nbytes / 2**20:.0f} MiB"
    if mesh is not None:
        cache += f" per process, tensor parallel over {mesh.size()}"
        if dist.get_rank() != 0:
            try:
                follow(engine, mesh.get_group())
            finally:
                dist.destroy_process_group()
            exit_without_teardown(0)
        engine = LockstepEngine(engine, mesh.get_group())

    loop = EngineLoop(engine).start()
    cfg = ServerConfig(model_name=args.model_name or "arbor", api_key=args.api_key)
    logging.info(
        "serving %s as %r on http://%s:%d (batch %d, context %d tokens, RoPE %s, %s)",
        loaded.source,
        cfg.model_name,
        args.host,
        args.port,
        args.max_batch,
        max_len,
        loaded.args.rope_scaling or "plain",
        cache,
    )
    try:
        uvicorn.run(create_app(loop, cfg), host=args.host, port=args.port, log_level="warning")
    finally:
        loop.stop()
        if mesh is not None:
            dist.destroy_process_group()
    if mesh is not None:
        exit_without_teardown(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
