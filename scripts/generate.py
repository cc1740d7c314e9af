#!/usr/bin/env python
"""Generate text from a checkpoint: the continuation streams to stdout as it is produced, the
prefill and decode speeds go to stderr.

    python scripts/generate.py --prompt "def fibonacci(n):" --max-new-tokens 100
    python scripts/generate.py --checkpoint outputs/debug/checkpoints/step-200 \\
        --prompt-file prompts.txt --batch --temperature 0

With several prompts (repeated --prompt, or --batch with one prompt per line of the file) they
decode together in one batch and each is printed whole when it finishes. Each prompt samples
with the same --seed, so it gives the same text as when run alone.

The checkpoint's RoPE scaling (model_args.json, or an HF config's rope_parameters) is used as
saved; `--rope-scaling yarn --rope-factor 4` (other params: `--rope-param KEY=VALUE`) runs the
model with another one, or `--rope-scaling none` without, to go past the trained length.

Started by torchrun, the model is split tensor-parallel over the processes (each loads its
shard; see plugins/inference/tensor_parallel.py) and the first one prints:

    torchrun --standalone --nproc_per_node=2 scripts/generate.py --prompt "def f(x):"
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from plugins.inference.cli import (
    add_model_arguments,
    check_sizes,
    engine_factory,
    load_from_args,
)
from plugins.inference.engine import Engine, Request
from plugins.inference.loading import LOAD_ERRORS
from plugins.inference.rope import context_length
from plugins.inference.sampling import SamplingParams
from plugins.inference.tensor_parallel import exit_without_teardown, tensor_parallel_mesh


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    parser.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    parser.add_argument(
        "--batch", action="store_true", help="each non-empty line of --prompt-file is a prompt"
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=200, help="0 keeps every token")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompt_file:
        parser.error("give --prompt or --prompt-file")
    if args.batch and not args.prompt_file:
        parser.error("--batch reads its prompts from --prompt-file")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        text = args.prompt_file.read_text()
        prompts += [line for line in text.splitlines() if line.strip()] if args.batch else [text]
    return prompts


def run(engine: Engine, prompts: list[str], params: SamplingParams) -> list[Request]:
    """Generate all prompts in one batch, printing text as it becomes final."""
    out = sys.stdout
    if len(prompts) == 1:
        out.write(prompts[0])

        def on_update(request: Request, delta: str) -> None:
            out.write(delta)
            out.flush()
            if request.finish_reason is not None:
                out.write("\n")

    else:

        def on_update(request: Request, delta: str) -> None:
            if request.finish_reason is not None:
                i = requests.index(request)
                out.write(f"--- [{i}] ({request.finish_reason}) ---\n{prompts[i]}{request.text}\n")
                out.flush()

    requests = [engine.submit(p, params, on_update) for p in prompts]
    while engine.has_work():
        engine.step()
    return requests


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mesh = tensor_parallel_mesh()
    if mesh is None:
        return generate(args, mesh)
    try:
        if dist.get_rank() == 0:
            status = generate(args, mesh)
        else:
            # The other processes compute the same tokens (identical logits after the gather,
            # the same seeds); their text and speeds would only repeat the first one's.
            with (
                open(os.devnull, "w") as devnull,
                contextlib.redirect_stdout(devnull),
                contextlib.redirect_stderr(devnull),
            ):
                status = generate(args, mesh)
        dist.barrier()  # leave together: a process that exits while its peer still talks aborts
    finally:
        dist.destroy_process_group()
    exit_without_teardown(status)


def generate(args: argparse.Namespace, mesh: DeviceMesh | None) -> int:
    prompts = read_prompts(args)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        params.validate()
        make_engine = engine_factory(args.engine)
        loaded = load_from_args(args, mesh)
    except LOAD_ERRORS as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    tokenizer = loaded.tokenizer
    longest = max(len(tokenizer.encode(p)) + 1 for p in prompts)  # +1: the BOS
    max_len = longest + args.max_new_tokens
    try:
        check_sizes(
            loaded.args,
            loaded.model.tok_embeddings.weight.dtype,
            loaded.model.tok_embeddings.weight.device,
            ("prompts", len(prompts)),
            ("--max-new-tokens + prompt", max_len),
            past_context_ok=True,  # RoPE extends, with the note below
        )
    except ValueError as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    context = context_length(loaded.args)
    if max_len > context:
        print(
            f"note: {max_len} positions exceed the model's context length {context} (its "
            "training length, or what its RoPE scaling reaches); RoPE is extended to cover "
            "them (--rope-scaling NAME --rope-factor F scales it instead)",
            file=sys.stderr,
        )
    engine = make_engine(loaded.model, tokenizer, len(prompts), max_len, args.compile)
    if args.compile:
        engine.warm_up()  # here, where it steps: apart from the decode timings
        print(f"compile: {engine.stats.compile_s:.1f}s (decode step)", file=sys.stderr)
    run(engine, prompts, params)
    stats = engine.stats
    print(
        f"prefill: {stats.prefill_tokens} tokens at {stats.prefill_tokens_per_s:,.1f} tokens/s; "
        f"decode: {stats.decode_tokens} tokens in {stats.decode_steps} steps at "
        f"{stats.decode_tokens_per_s:,.1f} tokens/s (batch {len(prompts)}, {args.dtype}, "
        f"{args.device}{f', tensor parallel over {mesh.size()}' if mesh is not None else ''})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
