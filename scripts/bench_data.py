"""Data preparation at scale: tokenization MB/s and peak memory with 1 and 2 workers, the
loader's tokens/s against what a training step consumes, and tokenizer training time with
sentencepiece against the `tokenizers` BPE trainer.

    python scripts/bench_data.py [--size-mb 500] [--sample-mb 20] [--out outputs/bench_data]
    python scripts/bench_data.py --quick   # a 2 MB corpus: seconds, checks that it all runs

1. Writes a deterministic JSONL corpus of --size-mb MB of text under OUT/corpus/ (this Python's
   standard library sources, then copies of them with each file's lines shuffled by a fixed
   seed), kept for later runs.
2. Trains a BPE tokenizer of the debug config's vocabulary on the corpus' first --sample-mb MB,
   with the project's sentencepiece settings and with `tokenizers`' BpeTrainer (byte-level),
   and compares their time and bytes per token on text neither trained on.
3. Builds the token cache with 1, then 2 workers, each in a fresh process: MB of text per
   second and the peak RSS of that process and of its largest worker (getrusage).
4. Reads the cache with the training loader at the debug model's shape, and times training
   steps of the debug model on it: the loader must be far faster than the step.

Prints a markdown table and writes OUT/results.json.
"""

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs/debug_model.toml"
_FILE_MB = 50  # corpus file size: a few dozen JSONL files for the full corpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=500, help="corpus text to generate")
    parser.add_argument("--sample-mb", type=float, default=20, help="tokenizer training text")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench_data")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--loader-s", type=float, default=10, help="seconds of loader reading")
    parser.add_argument(
        "--shard-mchars", type=float, default=None, help="shard size (default: the product's)"
    )
    parser.add_argument("--quick", action="store_true", help="a 2 MB corpus, tiny everything")
    parser.add_argument(
        "--measure-tokenize",
        type=int,
        metavar="WORKERS",
        help="(run by the bench in a fresh process) build the cache with WORKERS, print JSON",
    )
    parser.add_argument("--tokenizer", type=Path, help="with --measure-tokenize")
    parser.add_argument("--cache-dir", type=Path, help="with --measure-tokenize")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.sample_mb, args.steps, args.loader_s = 2, 0.5, 1, 0.5
        args.shard_mchars = args.shard_mchars or 0.5
    return args


def write_corpus(out: Path, size_mb: float) -> dict:
    """The corpus files (kept and reused when a run of the same size wrote them)."""
    folder, marker = out / "corpus", out / "corpus.json"
    if marker.exists() and json.loads(marker.read_text())["size_mb"] == size_mb:
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    info = {"size_mb": size_mb, "text_bytes": 0, "documents": 0, "files": 0}
    lines, part_bytes = [], 0
    for text in corpus_texts(size_mb):
        lines.append(json.dumps({"text": text}) + "\n")
        size = len(text.encode())
        part_bytes += size
        info["text_bytes"] += size
        info["documents"] += 1
        if part_bytes >= _FILE_MB * 1e6:
            _write_part(folder, info, lines)
            lines, part_bytes = [], 0
    if lines:
        _write_part(folder, info, lines)
    marker.write_text(json.dumps(info))
    return info


def corpus_texts(size_mb: float) -> Iterator[str]:
    """This Python's standard library sources, then copies of them with each file's lines
    shuffled (seeded by the copy's number), until `size_mb` MB of text."""
    from arbor_titan.data import Corpus, DataConfig

    files = [path for _, path in Corpus(DataConfig()).files]  # sorted by name
    left = size_mb * 1e6
    for copy in itertools.count():
        rng = random.Random(copy)
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if not text:
                continue
            if copy:
                lines = text.splitlines(keepends=True)
                rng.shuffle(lines)
                text = "".join(lines)
            yield text
            left -= len(text.encode())
            if left <= 0:
                return


def _write_part(folder: Path, info: dict, lines: list[str]) -> None:
    (folder / f"part-{info['files']:03d}.jsonl").write_text("".join(lines))
    info["files"] += 1


def corpus_config(out: Path):
    from arbor_titan.data import DataConfig

    return DataConfig(source="jsonl", paths=[str(out / "corpus/*.jsonl")])


def sample_texts(out: Path, megabytes: float, skip_mb: float = 0) -> list[str]:
    """`megabytes` MB of the corpus' documents, from `skip_mb` MB on (read directly: opening
    the corpus would first split all of it)."""
    texts, size = [], 0
    for part in sorted((out / "corpus").glob("*.jsonl")):
        with part.open() as f:
            for line in f:
                text = json.loads(line)["text"]
                size += len(text.encode())
                if size > skip_mb * 1e6:
                    texts.append(text)
                if size >= (skip_mb + megabytes) * 1e6:
                    return texts
    return texts


def train_tokenizers(out: Path, sample_mb: float, vocab_size: int) -> tuple[Path, dict]:
    """Both trainers on the same sample; returns the sentencepiece model (the product's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from arbor_titan.data import Corpus, DataConfig, TokenizerConfig
    from arbor_titan.data.tokenizer import load_or_train_tokenizer

    sample = out / "sample" / "sample.jsonl"
    texts = sample_texts(out, sample_mb)
    sample.parent.mkdir(parents=True, exist_ok=True)
    sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    held_out = sample_texts(out, min(sample_mb, 2), skip_mb=sample_mb)
    held_out_bytes = sum(len(t.encode()) for t in held_out)
    results = {}

    start = time.perf_counter()
    tok_cfg = TokenizerConfig(vocab_size=vocab_size)
    sample_corpus = Corpus(DataConfig(source="jsonl", paths=[str(sample)], val_fraction=0))
    cache = out / "tokenizer"
    shutil.rmtree(cache, ignore_errors=True)
    sp = load_or_train_tokenizer(tok_cfg, sample_corpus, cache, lambda line: None)
    results["sentencepiece"] = {
        "seconds": time.perf_counter() - start,
        "bytes_per_token": held_out_bytes / sum(len(sp.encode(t)) for t in held_out),
    }

    start = time.perf_counter()
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    seconds = time.perf_counter() - start
    encoded = sum(len(e.ids) for e in hf.encode_batch(held_out, add_special_tokens=False))
    results["tokenizers"] = {"seconds": seconds, "bytes_per_token": held_out_bytes / encoded}
    results["sample_bytes"] = sum(len(t.encode()) for t in texts)
    results["held_out_bytes"] = held_out_bytes
    return sp.path, results


def measure_tokenize(args: argparse.Namespace) -> dict:
    """One cache build from scratch in this process (the bench's fresh child): wall and CPU
    time, and the resident memory of this process and its workers."""
    from arbor_titan.data import Corpus
    from arbor_titan.data.token_cache import SHARD_CHARS, build_token_cache
    from arbor_titan.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    start = time.perf_counter()
    corpus = Corpus(corpus_config(args.out))
    plan = corpus.plan  # the pass that splits the corpus, before any tokenizing
    plan_s = time.perf_counter() - start
    shard_chars = int(args.shard_mchars * 1e6) if args.shard_mchars else SHARD_CHARS
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    with TreeMemory() as memory:
        cache = build_token_cache(
            tokenizer,
            corpus,
            args.cache_dir,
            not args.quick,
            lambda line: None,
            args.measure_tokenize,
            shard_chars,
        )
    seconds = time.perf_counter() - start
    cpu = {who: after - cpu_before[who] for who, after in _cpu_seconds().items()}
    manifest = json.loads((cache.root / "manifest.json").read_text())
    return {
        "workers": args.measure_tokenize,
        "documents": sum(plan.num_docs.values()),
        "text_bytes": sum(shard["nbytes"] for shard in manifest["shards"]),
        "tokens": sum(cache.num_tokens.values()),
        "shards": len(manifest["shards"]),
        "plan_seconds": plan_s,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_average": os.getloadavg()[0],
        "peak_rss_mb": max(memory.peaks["self"], _own_peak_rss_mb()),
        "worker_peak_rss_mb": memory.peaks["largest_child"],
        "total_peak_rss_mb": memory.peaks["total"],
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) of this process, and of its children that have ended."""
    times = {}
    for who, scope in (("self", resource.RUSAGE_SELF), ("workers", resource.RUSAGE_CHILDREN)):
        usage = resource.getrusage(scope)
        times[who] = usage.ru_utime + usage.ru_stime
    return times


def _own_peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM: unlike ru_maxrss, not inherited from
    the process that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class TreeMemory:
    """Samples the resident memory of this process and of its children (Linux /proc) every
    `every_s` in a thread; `peaks` holds the highest of this process, of the largest child,
    and of all of them together."""

    def __init__(self, every_s: float = 0.1):
        self.every_s = every_s
        self.peaks = {"self": 0.0, "largest_child": 0.0, "total": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.every_s):
            children = [_rss_mb(pid) for pid in _children(me)]
            own = _rss_mb(me)
            self.peaks["self"] = max(self.peaks["self"], own)
            self.peaks["largest_child"] = max(self.peaks["largest_child"], *children, 0.0)
            self.peaks["total"] = max(self.peaks["total"], own + sum(children))


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # it ended meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry))
    return found


def _rss_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def tokenize_in_child(args: argparse.Namespace, workers: int, tokenizer: Path, cache: Path):
    command = [sys.executable, __file__, "--out", str(args.out), "--measure-tokenize"]
    command += [str(workers), "--tokenizer", str(tokenizer), "--cache-dir", str(cache)]
    if args.shard_mchars:
        command += ["--shard-mchars", str(args.shard_mchars)]
    if args.quick:
        command.append("--quick")
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
    return json.loads(done.stdout.splitlines()[-1])


def train_config(args: argparse.Namespace, tokenizer: Path, dump_folder: Path):
    """The debug model on the bench corpus; its dump folder's cache is the 2-worker one."""
    from arbor_titan.config.cli import load_config

    overrides = [
        f"--job.dump_folder={dump_folder}",
        "--data.source=jsonl",
        f"--data.paths=['{corpus_config(args.out).paths[0]}']",
        f"--tokenizer.path={tokenizer}",
        f"--training.steps={args.steps + 1}",
        "--lr_scheduler.warmup_steps=1",  # the config's 20 would warn the run is shorter
        "--validation.enable=false",
        "--checkpoint.enable=false",
        "--metrics.enable_tensorboard=false",
        "--metrics.enable_jsonl=false",
    ]
    if args.quick:
        overrides += ["--training.seq_len=64", "--training.local_batch_size=4"]
    return load_config(CONFIG, overrides)


def measure_loader_and_steps(args: argparse.Namespace, cfg) -> dict:
    """Loader tokens/s at the training shape, then the training step's tokens/s."""
    import logging

    from arbor_titan.data import build_dataloader, prepare_data
    from arbor_titan.trainer import Trainer

    logging.getLogger("arbor_titan").setLevel(logging.WARNING)
    seq_len, batch = cfg.training.seq_len, cfg.training.local_batch_size
    start = time.perf_counter()
    cache_dir = Path(cfg.job.dump_folder) / "cache"
    data = prepare_data(cfg.data, cfg.tokenizer, cache_dir, False, log=lambda line: None)
    loader = build_dataloader(data, "train", seq_len, batch, 0, 1, cfg.training.seed)
    setup_s = time.perf_counter() - start
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.loader_s:
        next(loader)
        batches += 1
    loader_tps = batches * batch * seq_len / (time.perf_counter() - start)

    trainer = Trainer(cfg)
    trainer.train_iter = iter(trainer.train_loader)
    durations = []
    for _ in range(args.steps + 1):  # the first step (warm-up) is not timed
        start = time.perf_counter()
        trainer.train_step()
        durations.append(time.perf_counter() - start)
    step_s = sorted(durations[1:])[len(durations[1:]) // 2]
    return {
        "seq_len": seq_len,
        "batch": batch,
        "train_tokens": data.cache.num_tokens["train"],
        "loader_setup_seconds": setup_s,
        "loader_tokens_per_s": loader_tps,
        "step_seconds": step_s,
        "step_tokens_per_s": batch * seq_len / step_s,
    }


def table(results: dict) -> str:
    corpus, trainers = results["corpus"], results["tokenizer_training"]
    loader = results["loader"]
    vocab, sample_mb = results["vocab_size"], trainers["sample_bytes"] / 1e6
    rows = [
        (
            "machine",
            f"{results['cores']} cores ({results['cpu']}), load average "
            f"{results['load_average']:.1f} when the bench started",
        ),
        (
            "corpus",
            f"{corpus['text_bytes'] / 1e6:,.1f} MB of text, {corpus['documents']:,} "
            f"documents (JSONL, {corpus['files']} files)",
        ),
    ]
    for name, label in (("sentencepiece", "sentencepiece BPE"), ("tokenizers", "tokenizers BPE")):
        t = trainers[name]
        rows.append(
            (
                f"train tokenizer: {label}, vocab {vocab}, {sample_mb:,.1f} MB sample",
                f"{t['seconds']:.1f} s; {t['bytes_per_token']:.2f} bytes/token on "
                f"{trainers['held_out_bytes'] / 1e6:.1f} MB held out",
            )
        )
    for run in results["tokenize"]:
        rows.append(_tokenize_row(run))
    ratio = loader["loader_tokens_per_s"] / loader["step_tokens_per_s"]
    rows += [
        (
            f"loader, seq {loader['seq_len']} x batch {loader['batch']}, in-process",
            f"{loader['loader_tokens_per_s']:,.0f} tokens/s (opening the {loader['train_tokens']:,}"
            f"-token split: {loader['loader_setup_seconds']:.1f} s)",
        ),
        (
            "training step, debug model",
            f"{loader['step_tokens_per_s']:,.0f} tokens/s: the loader is {ratio:,.0f}x faster "
            f"({100 / ratio:.2f}% of a step)",
        ),
    ]
    lines = ["| measured | result |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in rows]
    return "\n".join(lines)


def _tokenize_row(run: dict) -> tuple[str, str]:
    workers, mb = run["workers"], run["text_bytes"] / 1e6
    cpu = run["cpu_seconds"]
    if workers == 1:
        spent = f"CPU {cpu['self']:.0f} s"
        memory = f"peak RSS {run['peak_rss_mb']:.0f} MB"
    else:
        spent = f"CPU {cpu['self']:.0f} s parent + {cpu['workers']:.0f} s workers"
        memory = (
            f"peak RSS {run['peak_rss_mb']:.0f} MB parent, {run['worker_peak_rss_mb']:.0f} MB "
            f"largest worker, {run['total_peak_rss_mb']:.0f} MB together"
        )
    return (
        f"tokenize into the cache, {workers} worker{'s' if workers > 1 else ''}",
        f"{mb / run['seconds']:.1f} MB/s ({run['seconds']:.0f} s wall, {spent}: "
        f"{mb / sum(cpu.values()):.1f} MB per CPU-second; load average {run['load_average']:.1f} "
        f"at the end); {run['tokens']:,} tokens in {run['shards']} shards; {memory}",
    )


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.measure_tokenize is not None:
        print(json.dumps(measure_tokenize(args)))
        return None
    import torch

    from arbor_titan.config.cli import load_config
    from arbor_titan.data.shards import available_cores

    load_average = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"writing the corpus ({args.size_mb:g} MB) ...", flush=True)
    corpus = write_corpus(args.out, args.size_mb)
    dump_folder = args.out / "train"
    vocab = 512 if args.quick else load_config(CONFIG).tokenizer.vocab_size
    print(f"training tokenizers (vocab {vocab}) ...", flush=True)
    tokenizer, trainers = train_tokenizers(args.out, args.sample_mb, vocab)
    runs = []
    for workers in (1, 2):
        print(f"tokenizing with {workers} worker(s) ...", flush=True)
        cache = dump_folder / "cache" if workers == 2 else args.out / "cache-1-worker"
        runs.append(tokenize_in_child(args, workers, tokenizer, cache))
    print("timing the loader and training steps ...", flush=True)
    loader = measure_loader_and_steps(args, train_config(args, tokenizer, dump_folder))
    results = {
        "cores": available_cores(),
        "cpu": _cpu_model(),
        "load_average": load_average,
        "torch_threads": torch.get_num_threads(),
        "vocab_size": vocab,
        "corpus": corpus,
        "tokenizer_training": trainers,
        "tokenize": runs,
        "loader": loader,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
