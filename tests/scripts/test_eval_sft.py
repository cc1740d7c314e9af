"""scripts/eval_sft.py on a tiny checkpoint: the answer loss is the model's own (a direct forward
over the served prompt agrees), exact match and overlap score the engine's greedy answers, and
the table, JSON and plot are written."""

import importlib.util
import json

import torch
import torch.nn.functional as F

from arbor_titan.data.chat_template import Message, encode_prompt
from plugins.inference.engine import create_engine
from plugins.inference.loading import load_model
from plugins.inference.sampling import SamplingParams
from tests.conftest import REPO
from tests.plugins.inference.tiny import (
    random_model,
    save_dcp_checkpoint,
    tiny_args,
    train_tokenizer,
)

spec = importlib.util.spec_from_file_location("eval_sft", REPO / "scripts/eval_sft.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

QUESTIONS = [
    ("What does `textwrap.dedent` do?", "Remove any common leading whitespace."),
    ("What is the signature of `textwrap.dedent`?", "textwrap.dedent(text)"),
]


def served_answer_loss(loaded, question: str, answer: str) -> tuple[float, int]:
    """Summed loss of `answer` + EOS after the served prompt, and its token count."""
    tokenizer = loaded.tokenizer
    prompt = encode_prompt([Message("user", question)], tokenizer)
    target = tokenizer.encode(answer) + [tokenizer.eos_id]
    ids = torch.tensor(prompt + target)
    with torch.no_grad():
        logits = loaded.model(ids[None, :-1])[0]
    scored = logits[len(prompt) - 1 :]
    return F.cross_entropy(scored, torch.tensor(target), reduction="sum").item(), len(target)


def test_scores_and_outputs(tmp_path, capsys):
    tokenizer_path = train_tokenizer(tmp_path / "tokenizer.model")
    checkpoint = save_dcp_checkpoint(random_model(tiny_args()), tmp_path / "ckpt", tokenizer_path)
    loaded = load_model(checkpoint)
    # The first question's reference is the model's own greedy answer: an exact match.
    engine = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=64)
    prompt = encode_prompt([Message("user", QUESTIONS[0][0])], loaded.tokenizer)
    (greedy,) = engine.generate([prompt], SamplingParams(max_new_tokens=4, stop=("\n\nUser:",)))
    questions = [(QUESTIONS[0][0], greedy.text), QUESTIONS[1]]
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(
            json.dumps({"kind": kind, "prompt": q, "response": a}) + "\n"
            for kind, (q, a) in zip(("description", "signature"), questions)
        )
    )
    out, plot = tmp_path / "out", tmp_path / "plot.png"
    argv = ["--before", str(checkpoint), "--data", str(data), "--max-new-tokens", "4"]
    assert script.main([*argv, "--out", str(out), "--plot", str(plot)]) == 0
    (result,) = json.loads((out / "eval_sft.json").read_text())["results"]
    sums = [served_answer_loss(loaded, q, a) for q, a in questions]
    expected_loss = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert abs(result["answer_loss"] - expected_loss) < 1e-4
    assert result["by_kind"]["description"]["exact_match"] == 1.0
    assert result["exact_match"] == (1.0 + (greedy.text == questions[1][1])) / 2
    assert result["samples"][0]["answer"] == greedy.text
    assert plot.stat().st_size > 0
    assert "| before |" in capsys.readouterr().out


def test_word_overlap():
    assert script.word_f1("Remove common whitespace", "remove any common leading whitespace") == (
        2 * 1 * 0.6 / 1.6
    )
    assert script.word_f1("", "x") == 0.0
