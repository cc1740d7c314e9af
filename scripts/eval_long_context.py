#!/usr/bin/env python
"""Long-context evaluation of a checkpoint: loss by position and passkey retrieval at multiples
of its trained length, under its own RoPE and under each RoPE scaling.

    python scripts/eval_long_context.py --checkpoint outputs/debug/checkpoints/step-200 \\
        [--multiples 1 2 4 8] [--scalings none linear ntk dynamic_ntk yarn llama3] \\
        [--text-file held_out.txt] [--out outputs/eval_long_context]

For the trained length L (the checkpoint's `max_seq_len`) and each multiple m, the model runs at
m·L tokens with its RoPE table rebuilt for that length: `none` is the checkpoint's own RoPE
(plain, or the scaling it was trained with), every other name is that `rope_scaling` plugin with
factor = m (and original_max_seq_len = L where it takes one), in place of the checkpoint's own.

- Loss by position: consecutive windows of m·L + 1 tokens from the start of the held-out text,
  one plain forward each; the per-token loss is averaged over windows, then over `--buckets`
  equal spans of positions. Held-out text: the `--text-file`s (each file one document), or by
  default the validation split of the run that saved the checkpoint (its `config.toml` two
  folders up), longest documents first, so that long windows fall inside long documents.
- Passkey retrieval: a random 5-digit key ("The pass key is NNNNN. Remember it. NNNNN is the
  pass key.") hidden at each `--depth` (0 = start, 1 = end) of repeated filler sentences ("The
  grass is green. The sky is blue. ...") that fill the length, then "What is the pass key? The
  pass key is"; the greedy continuation must begin with the key. Trial t uses the key drawn
  with seed `--seed` + t, the same at every length, scaling and depth.

Prints a table to stdout and progress to stderr; writes `eval_long_context.json` and
`eval_long_context.png` (loss by position, one panel per multiple, one line per scaling; needs
matplotlib) to `--out`.
"""

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from arbor_titan import registry
from arbor_titan.config.cli import load_config
from arbor_titan.config.loader import ConfigError
from arbor_titan.data.corpus import Corpus
from arbor_titan.data.tokenizer import Tokenizer
from arbor_titan.models.arbor.model import Transformer
from plugins.inference.cli import DEFAULT_CHECKPOINTS
from plugins.inference.loading import DTYPES, LOAD_ERRORS, load_model, newest_checkpoint

OWN_ROPE = "none"
SCALINGS = [OWN_ROPE, "linear", "ntk", "dynamic_ntk", "yarn", "llama3"]
FILLER = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class Result:
    """One (length, scaling) cell of the evaluation."""

    multiple: int
    length: int
    scaling: str
    rope_scaling: dict | None  # the settings the RoPE table was built with
    windows: int
    loss: float  # mean over every position of every window
    bucket_start: list[int]  # first position of each bucket
    bucket_loss: list[float]
    passkey: dict[str, float | None]  # depth → accuracy (None: the prompt can't fit)
    passkey_accuracy: float | None  # over every depth that fits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a DCP step-N folder, .pt file or HF folder "
        f"(default: the newest checkpoint in {DEFAULT_CHECKPOINTS})",
    )
    parser.add_argument("--model-args", type=Path, help="model_args.json for a .pt file")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model, if not beside the weights")
    parser.add_argument(
        "--text-file",
        type=Path,
        nargs="+",
        help="held-out text, each file one document (default: the run's validation split)",
    )
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--scalings",
        nargs="+",
        default=SCALINGS,
        help=f"'{OWN_ROPE}' (the checkpoint's own RoPE) and rope_scaling plugin names",
    )
    parser.add_argument("--buckets", type=int, default=8, help="position buckets per length")
    parser.add_argument("--windows", type=int, default=4, help="loss windows per length (at most)")
    parser.add_argument(
        "--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="in [0, 1]"
    )
    parser.add_argument("--trials", type=int, default=5, help="passkey trials per depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/eval_long_context"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    args = parser.parse_args(argv)
    if any(m < 1 for m in args.multiples):
        parser.error("--multiples must be positive integers")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        parser.error("--depths must lie in [0, 1]")
    for name in ("buckets", "windows", "trials"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def check_scalings(names: list[str]) -> None:
    """Fail before any work on a name that is neither `none` nor a registered scaling."""
    known = registry.names("rope_scaling")
    for name in names:
        if name != OWN_ROPE and name not in known:
            raise ValueError(
                f"--scalings: unknown scaling {name!r}; choose '{OWN_ROPE}' or a registered "
                f"rope_scaling: {', '.join(known) or 'none registered'}"
            )


def scaling_settings(name: str, multiple: int, trained_len: int, own: dict | None) -> dict | None:
    """RoPE settings for `name` at `multiple` × the trained length (`original_max_seq_len`
    only for the scalings that take it: `linear` and `ntk` need the factor alone)."""
    if name == OWN_ROPE:
        return own
    settings = {"type": name, "factor": float(multiple)}
    params = {field.name for field in fields(registry.get("rope_scaling", name).Params)}
    if "original_max_seq_len" in params:
        settings["original_max_seq_len"] = trained_len
    return settings


@contextmanager
def use_rope(model: Transformer, length: int, settings: dict | None) -> Iterator[None]:
    """Inside the block the model's RoPE runs under `settings`, a length-dependent scaling
    evaluated at `length`; the checkpoint's own args come back after it."""
    own = model.args, model.rope_length
    model.args, model.rope_length = replace(model.args, rope_scaling=settings), length
    try:
        yield
    finally:
        model.args, model.rope_length = own


def held_out_documents(args: argparse.Namespace) -> tuple[list[str], str]:
    """(documents, where they came from): the --text-file(s), else the run's validation split."""
    if args.text_file:
        return [path.read_text() for path in args.text_file], ", ".join(map(str, args.text_file))
    config = args.checkpoint.parent.parent / "config.toml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config}: no training config two folders above the checkpoint to find its "
            "validation split; pass --text-file"
        )
    documents = [text for _, text in Corpus(load_config(config).data).documents("val")]
    if not documents:
        raise ValueError(f"{config}: the run has no validation documents; pass --text-file")
    documents.sort(key=len, reverse=True)
    return documents, f"validation split of {config}"


def token_stream(documents: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """`[BOS] doc [EOS] ...`, the layout the model was trained on."""
    ids = []
    for text in documents:
        ids += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    return torch.tensor(ids)


@torch.no_grad()
def position_losses(
    model: Transformer, stream: torch.Tensor, length: int, windows: int
) -> torch.Tensor:
    """Per-position next-token loss (length,), averaged over the first `windows` consecutive
    windows of `length` + 1 tokens."""
    device = model.tok_embeddings.weight.device
    total = torch.zeros(length, dtype=torch.float64)
    for index in range(windows):
        window = stream[index * (length + 1) : (index + 1) * (length + 1)].to(device)
        logits_sv = model(window[None, :-1])[0].float()
        total += F.cross_entropy(logits_sv, window[1:], reduction="none").double().cpu()
    return total / windows


def bucket_means(losses: torch.Tensor, buckets: int) -> tuple[list[int], list[float]]:
    """(first position, mean loss) of `buckets` near-equal spans of positions."""
    bounds = [round(i * len(losses) / buckets) for i in range(buckets + 1)]
    spans = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    return [a for a, _ in spans], [losses[a:b].mean().item() for a, b in spans]


def passkey_prompt(tokenizer: Tokenizer, key: str, depth: float, budget: int) -> list[int] | None:
    """`[BOS]` filler with the needle at `depth`, then the question: at most `budget` tokens,
    None if even the needle and question alone don't fit."""
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    room = budget - 1 - len(needle) - len(question)
    if room < 0:
        return None
    sentences = [tokenizer.encode(sentence) for sentence in FILLER]
    filler = []
    while room >= len(sentences[len(filler) % len(sentences)]):
        filler.append(sentences[len(filler) % len(sentences)])
        room -= len(filler[-1])
    cut = round(depth * len(filler))
    parts = [*filler[:cut], needle, *filler[cut:], question]
    return [tokenizer.bos_id] + [token for part in parts for token in part]


@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by full forwards (no cache: the exact model under test)."""
    tokens = torch.tensor(prompt, device=model.tok_embeddings.weight.device)
    for _ in range(new_tokens):
        next_token = model(tokens[None])[0, -1].argmax()
        tokens = torch.cat([tokens, next_token[None]])
    return tokens[len(prompt) :].tolist()


def passkey_keys(seed: int, trials: int) -> list[str]:
    return [str(random.Random(seed + trial).randint(10000, 99999)) for trial in range(trials)]


def passkey_at_depth(
    model: Transformer, tokenizer: Tokenizer, keys: list[str], depth: float, length: int
) -> float | None:
    """Share of `keys` whose greedy answer begins with the key; None if the prompt can't fit."""
    correct = 0
    for key in keys:
        new_tokens = len(tokenizer.encode(f" {key}")) + 1
        prompt = passkey_prompt(tokenizer, key, depth, length - new_tokens)
        if prompt is None:
            return None
        answer = re.match(r"\s*(\d+)", tokenizer.decode(greedy(model, prompt, new_tokens)))
        correct += answer is not None and answer.group(1) == key
    return correct / len(keys)


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    stream: torch.Tensor,
    args: argparse.Namespace,
    multiple: int,
    scaling: str,
) -> Result:
    """One (multiple, scaling) cell, under its RoPE scaling."""
    trained_len = model.args.max_seq_len
    length = multiple * trained_len
    windows = min(args.windows, len(stream) // (length + 1))
    if windows == 0:
        raise ValueError(
            f"--text-file: the held-out text has {len(stream)} tokens, fewer than the "
            f"{length + 1} that {multiple}× the trained length needs; give more text or "
            "smaller --multiples"
        )
    settings = scaling_settings(scaling, multiple, trained_len, model.args.rope_scaling)
    keys = passkey_keys(args.seed, args.trials)
    with use_rope(model, length, settings):
        losses = position_losses(model, stream, length, windows)
        passkey = {
            str(depth): passkey_at_depth(model, tokenizer, keys, depth, length)
            for depth in args.depths
        }
    bucket_start, bucket_loss = bucket_means(losses, args.buckets)
    fitted = [accuracy for accuracy in passkey.values() if accuracy is not None]
    return Result(
        multiple=multiple,
        length=length,
        scaling=scaling,
        rope_scaling=settings,
        windows=windows,
        loss=losses.mean().item(),
        bucket_start=bucket_start,
        bucket_loss=bucket_loss,
        passkey=passkey,
        passkey_accuracy=sum(fitted) / len(fitted) if fitted else None,
    )


def format_table(results: list[Result], depths: list[float]) -> str:
    def accuracy(value: float | None) -> str:
        return "   -" if value is None else f"{value:4.2f}"

    depth_names = "".join(f"  d={d:<4g}" for d in depths)
    lines = [
        f"{'length':>7} {'×':>2}  {'scaling':<12} {'loss':>6} {'ppl':>9}  "
        f"{'loss by position bucket (first → last)':<48} passkey{depth_names}"
    ]
    for r in results:
        buckets = " ".join(f"{loss:.2f}" for loss in r.bucket_loss)
        per_depth = "".join(f"  {accuracy(r.passkey[str(d)]):>6}" for d in depths)
        ppl = math.exp(r.loss) if r.loss < 700 else math.inf
        lines.append(
            f"{r.length:>7} {r.multiple:>2}  {r.scaling:<12} {r.loss:>6.3f} {ppl:>9.1f}  "
            f"{buckets:<48} {accuracy(r.passkey_accuracy):>7}{per_depth}"
        )
    return "\n".join(lines)


def write_plot(results: list[Result], trained_len: int, path: Path) -> None:
    """Loss by position: one panel per multiple, one line per scaling, the trained length
    marked where the window runs past it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    multiples = sorted({r.multiple for r in results})
    fig, axes = plt.subplots(
        1, len(multiples), figsize=(4.5 * len(multiples), 4), sharey=True, squeeze=False
    )
    for ax, multiple in zip(axes[0], multiples):
        cells = [r for r in results if r.multiple == multiple]
        for r in cells:
            ends = [*r.bucket_start[1:], r.length]
            centers = [(a + b) / 2 for a, b in zip(r.bucket_start, ends)]
            ax.plot(centers, r.bucket_loss, marker="o", markersize=3, label=r.scaling)
        if multiple > 1:
            ax.axvline(trained_len, color="gray", linestyle="--", linewidth=1, label="trained")
        ax.set_title(f"{multiple}× trained length ({cells[0].length} tokens)")
        ax.set_xlabel("position")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (nats/token)")
    axes[0][-1].legend(title="RoPE")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_scalings(args.scalings)
        args.checkpoint = args.checkpoint or newest_checkpoint(DEFAULT_CHECKPOINTS)
        loaded = load_model(
            args.checkpoint, DTYPES[args.dtype], args.device, args.model_args, args.tokenizer
        )
        documents, source = held_out_documents(args)
    except LOAD_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tokenizer = loaded.model, loaded.tokenizer
    trained_len = model.args.max_seq_len
    stream = token_stream(documents, tokenizer)
    print(f"held-out text: {source}, {len(stream):,} tokens", file=sys.stderr)
    cells = [(m, s) for m in args.multiples for s in args.scalings]
    results = []
    for index, (multiple, scaling) in enumerate(cells, 1):
        start = time.perf_counter()
        try:
            result = evaluate(model, tokenizer, stream, args, multiple, scaling)
        except (ValueError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        results.append(result)
        print(
            f"[{index}/{len(cells)}] {result.length} tokens ({multiple}×), {scaling}: "
            f"loss {result.loss:.3f}, passkey {result.passkey_accuracy} "
            f"({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
        )
    print(f"{args.checkpoint}: trained length {trained_len}; held-out text: {source}")
    print(format_table(results, args.depths))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "checkpoint": str(args.checkpoint),
        "trained_length": trained_len,
        "rope_scaling": model.args.rope_scaling,
        "text": {"source": source, "tokens": len(stream)},
        "buckets": args.buckets,
        "depths": args.depths,
        "trials": args.trials,
        "seed": args.seed,
        "results": [asdict(r) for r in results],
    }
    (args.out / "eval_long_context.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_plot(results, trained_len, args.out / "eval_long_context.png")
    print(f"wrote {args.out / 'eval_long_context.json'} and eval_long_context.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
