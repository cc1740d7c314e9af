#!/usr/bin/env python
"""Inference benchmark, all measured in one run so ratios survive a noisy machine:

- decode tokens/s of the paged-KV-cache engine at batch 1 and 8, for the `bench` flavor
  (16.8M) and a ~200M model, fp32 and bf16 (random init: speed doesn't depend on the weights),
  and of one request alone on an engine with 8 slots (a lone client on a `--max-batch 8`
  server: it should decode at the batch-1 speed);
- the same models in `transformers` `generate`, if installed: eager with its default dynamic
  cache, and with its static cache and the forward under `torch.compile` (with `--compile`,
  where it compiles: a failure is reported and that baseline left out);
- the fraction of the memory-bandwidth roofline: a decode step must read every weight matrix
  once, so it can't be faster than weight bytes / bandwidth (measured here with a large sum:
  against the median over fresh allocations and against the best one);
- server throughput: 8 concurrent requests against the same 8 one at a time.

    python scripts/bench_inference.py --quick     # bench model only, fewer tokens (~1 min)
    python scripts/bench_inference.py --compile   # both models, eager and compiled (~5 min)

Each measurement is the best of a few runs, alternated between the engines. On a machine shared
with other work, `--threads 1` avoids OpenMP threads waiting on a busy core (up to 50x slower
steps, measured), at the price of one core's bandwidth.
"""

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from arbor_titan.models.arbor.args import FLAVORS, ArborArgs
from arbor_titan.models.arbor.model import Transformer, count_params
from plugins.inference.engine import create_engine
from plugins.inference.loading import DTYPES
from plugins.inference.sampling import SamplingParams

MODELS = {
    "bench": FLAVORS["bench"],
    # Llama proportions at ~200M: head_dim 64, GQA 2:1, FFN 2.75·dim, 32k vocab, untied.
    "200m": ArborArgs(
        dim=1024, n_layers=12, n_heads=16, n_kv_heads=8, ffn_dim=2816, vocab_size=32000
    ),
}
PROMPT_LEN = 16


class CountingTokenizer:
    """Stands in for sentencepiece on random models: cheap, and streams one char per token."""

    bos_id, eos_id = 1, 2

    @staticmethod
    def encode(text: str) -> list[int]:
        return [3 + ord(c) % 100 for c in text]

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "x" * len(ids)


@dataclass
class Row:
    model: str
    dtype: str
    batch: int
    slots: int
    ours_tok_s: float
    hf_tok_s: float | None
    hf_static_tok_s: float | None
    step_ms: float
    roofline_ms: float
    roofline_best_ms: float
    compile_s: float | None = None
    tokens_equal: int | None = None  # leading greedy tokens equal to transformers' (sequence 0)
    tokens: int = 0

    @property
    def roofline_fraction(self) -> float:
        return self.roofline_ms / self.step_ms

    @property
    def hf_ratio(self) -> float | None:
        return self.ours_tok_s / self.hf_tok_s if self.hf_tok_s else None

    @property
    def hf_static_ratio(self) -> float | None:
        return self.ours_tok_s / self.hf_static_tok_s if self.hf_static_tok_s else None


def measure_bandwidth(nbytes: int, allocations: int = 5) -> tuple[float, float]:
    """Read bandwidth in bytes/s: sums of a tensor far larger than caches, the best of three
    per allocation and the median over fresh allocations. (On this VM the rate depends on where
    an allocation lands: most read at 30-34 GB/s, some at 43-49; the median is the typical
    memory the model's weights also sit in; the best is returned too.)"""
    rates = []
    for _ in range(allocations):
        x = torch.ones(nbytes // 4)
        x.sum()
        rates.append(nbytes / min(_timed(x.sum) for _ in range(3)))
        del x
    return statistics.median(rates), max(rates)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_model(args: ArborArgs, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    return model.to(dtype).eval()


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads: every matrix, except that an untied embedding table is only
    indexed (one row per token)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.output is not None:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def prompts(batch: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    shape = (batch, PROMPT_LEN - 1)
    return [[1, *row] for row in torch.randint(3, vocab, shape, generator=generator).tolist()]


class OursDecode:
    """The engine decoding `batch` prompts; each `run()` times one generation's decode steps."""

    def __init__(
        self,
        model: Transformer,
        batch: int,
        new_tokens: int,
        max_len: int,
        compile: bool,
        slots: int | None = None,
    ):
        self.slots = slots or batch
        self.engine = create_engine(
            model, CountingTokenizer(), self.slots, max_len, compile=compile
        )
        self.engine.warm_up()
        self.compile_s = self.engine.stats.compile_s if compile else None
        self.ids = prompts(batch, model.args.vocab_size)
        self.params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        self.engine.generate(self.ids, SamplingParams(max_new_tokens=4, ignore_eos=True))
        self.best_step_s, self.tokens = float("inf"), []

    def run(self) -> None:
        stats = self.engine.stats = type(self.engine.stats)()
        self.tokens = self.engine.generate(self.ids, self.params)[0].output_ids
        self.best_step_s = min(self.best_step_s, stats.decode_s / stats.decode_steps)


class HFDecode:
    """transformers `generate` on the same prompts, timed per step by a logits processor: it is
    called once per new token, so the time between its first and last call is the decode steps
    alone (the prefill comes before the first call), the engine's `decode_s` counterpart."""

    def __init__(self, hf, batch: int, vocab: int, new_tokens: int, static: bool = False):
        """`static`: its static cache, with the forward compiled (as transformers' docs show)."""
        import transformers

        class StepClock(transformers.LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                self.times.append(time.perf_counter())
                return scores

        self.hf, self.input_ids, self.new_tokens = (
            hf,
            torch.tensor(prompts(batch, vocab)),
            new_tokens,
        )
        self.clock = StepClock()
        self.best_step_s, self.tokens = float("inf"), []
        self.cache = {"cache_implementation": "static"} if static else {}
        if static:
            hf.forward = torch.compile(hf.forward, fullgraph=True)
        # Warm up; a static cache is sized by the generation's length, so it warms up at the
        # length it is timed at (else the timed runs would compile again).
        self._generate(new_tokens if static else 4)

    def _generate(self, n: int) -> torch.Tensor:
        self.clock.times = []
        with torch.inference_mode():
            return self.hf.generate(
                self.input_ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                logits_processor=[self.clock],
                **self.cache,
            )

    def run(self) -> None:
        out = self._generate(self.new_tokens)
        times = self.clock.times
        self.best_step_s = min(self.best_step_s, (times[-1] - times[0]) / (len(times) - 1))
        self.tokens = out[0, PROMPT_LEN:].tolist()


def hf_model(model: Transformer):
    """The same weights as a transformers LlamaForCausalLM, or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    from arbor_titan.checkpoint.hf import hf_config, to_hf_name

    dtype = model.tok_embeddings.weight.dtype
    config = transformers.LlamaConfig(**hf_config(model.args, dtype, None))
    hf = transformers.LlamaForCausalLM(config).to(dtype).eval()
    hf.load_state_dict({to_hf_name(k): v for k, v in model.state_dict().items()}, strict=False)
    return hf


def server_throughput(model: Transformer, requests: int, new_tokens: int) -> tuple[float, float]:
    """Aggregate completion tokens/s: `requests` sent one at a time, then all at once."""
    import httpx

    from plugins.inference.server import BackgroundServer, ServerConfig, create_app
    from plugins.inference.service import EngineLoop

    engine = create_engine(model, CountingTokenizer(), requests, PROMPT_LEN + new_tokens)
    loop = EngineLoop(engine).start()
    bodies = [
        {"prompt": ids, "max_tokens": new_tokens, "temperature": 0}
        for ids in prompts(requests, model.args.vocab_size)
    ]
    try:
        with (
            BackgroundServer(create_app(loop, ServerConfig())) as server,
            httpx.Client(base_url=server.url, timeout=600) as client,
        ):

            def post(body: dict) -> int:
                response = client.post("/v1/completions", json=body)
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]

            post(bodies[0])  # warm up
            start = time.perf_counter()
            sequential = sum(post(b) for b in bodies) / (time.perf_counter() - start)
            start = time.perf_counter()
            with ThreadPoolExecutor(requests) as pool:
                concurrent = sum(pool.map(post, bodies)) / (time.perf_counter() - start)
    finally:
        loop.stop()
    return sequential, concurrent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bench model only, fewer tokens")
    parser.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps per run")
    parser.add_argument(
        "--max-len",
        type=int,
        help="KV cache positions per sequence (default: the model's max_seq_len, as a server "
        "would size it)",
    )
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--no-server", action="store_true", help="skip the server throughput")
    parser.add_argument("--rounds", type=int, help="runs per measurement; the best counts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (args.models or ("bench" if args.quick else "bench,200m")).split(",")
    new_tokens = args.new_tokens or (16 if args.quick else 48)
    rounds = args.rounds or (2 if args.quick else 3)
    compile_modes = (False, True) if args.compile else (False,)
    torch.manual_seed(0)

    bandwidth, best_bandwidth = measure_bandwidth((256 if args.quick else 512) * 2**20)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (median; best {best_bandwidth / 1e9:.1f}); "
        f"{new_tokens} decode steps per run after a {PROMPT_LEN}-token prompt, best of {rounds}",
        flush=True,
    )
    rows: list[Row] = []
    for name in names:
        for dtype_name in args.dtypes.split(","):
            model = build_model(MODELS[name], DTYPES[dtype_name])
            roofline_ms = 1e3 * weight_bytes(model) / bandwidth
            roofline_best_ms = 1e3 * weight_bytes(model) / best_bandwidth
            hf = None if args.no_hf else hf_model(model)
            # A second copy: its forward gets compiled.
            hf_static = hf_model(model) if hf is not None and args.compile else None
            print(
                f"{name} ({count_params(model) / 1e6:.1f}M params, {dtype_name}): "
                f"{weight_bytes(model) / 2**20:.0f} MiB read per step",
                flush=True,
            )
            batches = [int(b) for b in args.batches.split(",")]
            for batch in batches:
                max_len = args.max_len or model.args.max_seq_len
                # Batch 1 also alone on the most slots: the lone client of a busy-sized server.
                slot_counts = {batch, max(batches)} if batch == 1 else {batch}
                if args.compile:  # drop earlier groups' graphs: they count against dynamo's limit
                    torch._dynamo.reset()
                variants = [
                    OursDecode(model, batch, new_tokens, max_len, c, slots)
                    for c in compile_modes
                    for slots in sorted(slot_counts)
                ]
                theirs = HFDecode(hf, batch, model.args.vocab_size, new_tokens) if hf else None
                static = hf_static and static_baseline(hf_static, batch, model, new_tokens)
                runners = [*variants, *(r for r in (theirs, static) if r)]
                for _ in range(rounds):  # alternate, so load changes hit all alike
                    for runner in runners:
                        runner.run()
                for ours in variants:
                    row = Row(
                        name,
                        dtype_name,
                        batch,
                        ours.slots,
                        batch / ours.best_step_s,
                        batch / theirs.best_step_s if theirs else None,
                        batch / static.best_step_s if static else None,
                        1e3 * ours.best_step_s,
                        roofline_ms,
                        roofline_best_ms,
                        ours.compile_s,
                        leading_equal(ours.tokens, theirs.tokens) if theirs else None,
                        len(ours.tokens),
                    )
                    rows.append(row)
                    print("  " + _describe(row), flush=True)
            del model, hf, hf_static

    if not args.no_server:
        model = build_model(MODELS["bench"], torch.float32)
        sequential, concurrent = server_throughput(model, 8, new_tokens)
        print(
            f"server (bench, fp32): 8 one at a time {sequential:,.0f} tok/s; 8 concurrent "
            f"{concurrent:,.0f} tok/s ({concurrent / sequential:.2f}x, target >= 3x)"
        )
    else:
        sequential = concurrent = None
    if args.json:
        with open(args.json, "w") as f:
            result = {
                "bandwidth_gb_s": bandwidth / 1e9,
                "best_bandwidth_gb_s": best_bandwidth / 1e9,
                "rows": [asdict(r) | {"roofline_fraction": r.roofline_fraction} for r in rows],
                "server_sequential_tok_s": sequential,
                "server_concurrent_tok_s": concurrent,
            }
            json.dump(result, f, indent=2)
    return 0


def static_baseline(hf, batch: int, model: Transformer, new_tokens: int) -> "HFDecode | None":
    """transformers with its static cache and compiled forward, or None (said) where that
    doesn't compile here."""
    try:
        return HFDecode(hf, batch, model.args.vocab_size, new_tokens, static=True)
    except Exception as err:  # noqa: BLE001 - any failure means: no such baseline here
        print(f"  transformers static cache + compile failed, left out: {err}", flush=True)
        return None


def leading_equal(ours: list[int], theirs: list[int]) -> int:
    """How many tokens the two generations share before they first differ (random weights give
    near-equal logits, so bf16 rounding differences can flip an argmax)."""
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))


def _describe(row: Row) -> str:
    text = (
        f"batch {row.batch}{f' on {row.slots} slots' if row.slots != row.batch else ''}"
        f"{' compiled' if row.compile_s is not None else ''}: "
        f"{row.ours_tok_s:,.1f} tok/s, {row.step_ms:.1f} ms/step, "
        f"{100 * row.roofline_fraction:.0f}% of the {row.roofline_ms:.1f} ms roofline "
        f"({100 * row.roofline_best_ms / row.step_ms:.0f}% of {row.roofline_best_ms:.1f} ms at "
        "the best bandwidth)"
    )
    if row.hf_tok_s is not None:
        text += f"; transformers eager {row.hf_tok_s:,.1f} tok/s ({row.hf_ratio:.2f}x)"
    if row.hf_static_tok_s is not None:
        text += (
            f"; transformers static+compile {row.hf_static_tok_s:,.1f} tok/s "
            f"({row.hf_static_ratio:.2f}x)"
        )
    if row.tokens_equal is not None:
        text += f"; greedy tokens as transformers' {row.tokens_equal}/{row.tokens}"
    if row.compile_s is not None:
        text += f"; compile {row.compile_s:.1f}s (not in the timings)"
    return text


if __name__ == "__main__":
    sys.exit(main())
