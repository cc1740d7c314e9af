"""Held-out chat questions before and after fine-tuning: answer-token loss, exact match and word
overlap of the greedy answers, and how often the model ends its turn (docs/sft.md).

    python scripts/eval_sft.py --before outputs/debug/checkpoints/step-200 \\
        --after outputs/debug_sft/checkpoints/step-300 --data outputs/sft_data/eval.jsonl

Every number goes through the paths the trainer and the server use: the loss is the trainer's
(the conversation packed with answer flags, `answer_labels`, loss on answer tokens only), and
answers come from the inference engine on the request that `/v1/chat/completions` builds
(`parse_chat`: the chat template's prompt, greedy, stopping at EOS or the next user turn).

Prints a table; writes `eval_sft.json` to `--out` and the plot to `--plot` (needs matplotlib).
Lines of the data file may carry a `kind` (make_sft_data.py's "description" / "signature"): the
table also breaks exact match and overlap down by it.
"""

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from arbor_titan.data.chat import answer_labels, flag_answers, parse_conversation
from arbor_titan.data.chat_template import Message, encode_conversations
from arbor_titan.data.tokenizer import Tokenizer
from arbor_titan.models.arbor.loss import IGNORE_INDEX
from arbor_titan.models.arbor.model import Transformer
from plugins.inference.engine import create_engine
from plugins.inference.loading import LOAD_ERRORS, load_model
from plugins.inference.openai_api import parse_chat


@dataclass(frozen=True)
class Question:
    kind: str
    messages: list[Message]  # ends with the reference answer

    @property
    def reference(self) -> str:
        return self.messages[-1].content


@dataclass
class Scores:
    """One checkpoint's results on the questions."""

    label: str
    checkpoint: str
    answer_loss: float  # mean over every reference answer token (and its EOS)
    exact_match: float
    word_f1: float
    ended_turn: float  # share of answers that ended with EOS, as trained
    by_kind: dict[str, dict[str, float]]  # kind → exact_match, word_f1
    samples: list[dict[str, str]]


def read_questions(path: Path, limit: int) -> list[Question]:
    """The file's conversations that end with an assistant answer; `limit` of them, evenly
    spread over the file (0 = all)."""
    questions = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = parse_conversation(record)
        except ValueError as err:  # JSONDecodeError included
            raise ValueError(f"{path}:{lineno}: {err}") from None
        if messages[-1].role == "assistant":
            questions.append(Question(str(record.get("kind", "all")), messages))
    if not questions:
        raise ValueError(f"{path}: no conversation ends with an assistant answer")
    if limit and len(questions) > limit:
        questions = [questions[i * len(questions) // limit] for i in range(limit)]
    return questions


@torch.no_grad()
def answer_loss(model: Transformer, tokenizer: Tokenizer, questions: list[Question]) -> float:
    """Mean loss over the reference answers' tokens, each conversation packed as in training."""
    total, count = 0.0, 0
    encoded = encode_conversations([q.messages for q in questions], tokenizer)
    for ids, is_answer in encoded:
        inputs, labels = answer_labels(torch.from_numpy(flag_answers(ids, is_answer)).long())
        logits = model(inputs[None])[0].float()
        total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


def normalize(text: str) -> str:
    return " ".join(text.split())


def word_f1(answer: str, reference: str) -> float:
    """Overlap of lower-cased words (SQuAD's F1)."""
    said, wanted = (Counter(re.findall(r"\w+", t.lower())) for t in (answer, reference))
    common = sum((said & wanted).values())
    if not common:
        return 0.0
    precision, recall = common / sum(said.values()), common / sum(wanted.values())
    return 2 * precision * recall / (precision + recall)


def generate_answers(
    model: Transformer, tokenizer: Tokenizer, questions: list[Question], max_new_tokens: int
) -> list[tuple[str, bool]]:
    """Greedy answers to each question (the conversation before its reference answer) through
    the server's chat request path, and whether each ended with EOS."""
    requests = [
        parse_chat(
            {
                "messages": [{"role": m.role, "content": m.content} for m in q.messages[:-1]],
                "max_tokens": max_new_tokens,
                "temperature": 0,
            },
            tokenizer,
        )
        for q in questions
    ]
    longest = max(len(r.prompt) for r in requests) + max_new_tokens
    engine = create_engine(model, tokenizer, slots=8, max_len=longest)
    done = engine.generate([r.prompt for r in requests], [r.params for r in requests])
    return [(r.text, bool(r.output_ids) and r.output_ids[-1] == tokenizer.eos_id) for r in done]


def score(
    label: str, checkpoint: Path, questions: list[Question], max_new_tokens: int, samples: int
) -> Scores:
    loaded = load_model(checkpoint)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    loss = answer_loss(model, tokenizer, questions)
    answers = generate_answers(model, tokenizer, questions, max_new_tokens)
    exact = [normalize(a) == normalize(q.reference) for q, (a, _) in zip(questions, answers)]
    f1 = [word_f1(a, q.reference) for q, (a, _) in zip(questions, answers)]
    by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for q, e, f in zip(questions, exact, f1):
        by_kind[q.kind]["exact_match"].append(e)
        by_kind[q.kind]["word_f1"].append(f)
    return Scores(
        label,
        str(checkpoint),
        loss,
        _mean(exact),
        _mean(f1),
        _mean([ended for _, ended in answers]),
        {kind: {k: _mean(v) for k, v in m.items()} for kind, m in sorted(by_kind.items())},
        [
            {"question": q.messages[-2].content, "reference": q.reference, "answer": a}
            for q, (a, _) in list(zip(questions, answers))[:samples]
        ],
    )


def _mean(values: list) -> float:
    return sum(values) / len(values)


def format_table(results: list[Scores]) -> str:
    kinds = sorted({kind for r in results for kind in r.by_kind})
    header = ["model", "answer loss", "exact match", "word F1", "ended turn"]
    header += [f"{name} ({kind})" for kind in kinds for name in ("exact", "F1")]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.label, f"{r.answer_loss:.3f}", f"{r.exact_match:.1%}", f"{r.word_f1:.3f}"]
        cells.append(f"{r.ended_turn:.1%}")
        for kind in kinds:
            got = r.by_kind.get(kind, {})
            cells += [f"{got.get('exact_match', 0):.1%}", f"{got.get('word_f1', 0):.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_plot(results: list[Scores], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [
        ("held-out answer loss", [r.answer_loss for r in results], "{:.2f}"),
        ("exact match", [r.exact_match for r in results], "{:.1%}"),
        ("word F1", [r.word_f1 for r in results], "{:.3f}"),
        ("answers ending the turn (EOS)", [r.ended_turn for r in results], "{:.0%}"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    labels = [r.label for r in results]
    for ax, (title, values, fmt) in zip(axes, panels):
        bars = ax.bar(labels, values, color=["#999999", "#1f77b4", "#ff7f0e"][: len(values)])
        for bar, value in zip(bars, values):
            ax.annotate(
                fmt.format(value),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the checkpoint before fine-tuning")
    parser.add_argument("--after", type=Path, help="the checkpoint after fine-tuning")
    parser.add_argument(
        "--data", type=Path, default=Path("outputs/sft_data/eval.jsonl"), help="held-out JSONL"
    )
    parser.add_argument(
        "--limit", type=int, default=200, help="questions, evenly spread over the file (0 = all)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=96, help="per answer")
    parser.add_argument("--samples", type=int, default=5, help="answers kept in the JSON")
    parser.add_argument("--out", type=Path, default=Path("outputs/sft_eval"), help="JSON folder")
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG path (default: <out>/eval_sft.png)"
    )
    args = parser.parse_args(argv)
    if args.before is None and args.after is None:
        parser.error("give --before, --after or both")
    if args.limit < 0 or args.max_new_tokens < 1:
        parser.error("--limit must be >= 0 and --max-new-tokens >= 1")
    args.plot = args.plot or args.out / "eval_sft.png"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoints = [(n, p) for n, p in (("before", args.before), ("after", args.after)) if p]
    try:
        questions = read_questions(args.data, args.limit)
        results = [
            score(label, path, questions, args.max_new_tokens, args.samples)
            for label, path in checkpoints
        ]
    except (*LOAD_ERRORS, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(questions)} held-out questions from {args.data}")
    print(format_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "data": str(args.data),
        "questions": len(questions),
        "max_new_tokens": args.max_new_tokens,
        "results": [asdict(r) for r in results],
    }
    (args.out / "eval_sft.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_plot(results, args.plot)
    print(f"wrote {args.out / 'eval_sft.json'} and {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
