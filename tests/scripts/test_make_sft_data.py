"""scripts/make_sft_data.py: questions from docstrings and signatures (methods without `self`),
a split by top-level module that keeps evaluation functions out of training, and the same bytes
on every run."""

import importlib.util
import json
import shutil
import sysconfig
from pathlib import Path

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("make_sft_data", REPO / "scripts/make_sft_data.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

SOURCE = '''
def public(a, b=1, *args, key=None, **kw):
    """Add things together.

    More detail that is not part of the answer."""

def _private():
    """A private function's docstring."""

def undocumented(x):
    pass

class Box:
    def put(self, item, /):
        """Put an item
        in the box."""

    @classmethod
    def make(cls, n):
        """Make n boxes at once."""
'''

LIBRARY = ("textwrap", "string", "fnmatch", "shlex", "glob", "bisect", "heapq", "colorsys")


def test_questions_come_from_first_paragraphs_and_signatures():
    found = list(script.functions("pkg.mod", SOURCE))
    assert found == [
        script.Function(
            "pkg.mod", "public", "a, b=1, *args, key=None, **kw", "Add things together."
        ),
        script.Function("pkg.mod", "Box.put", "item, /", "Put an item in the box."),
        script.Function("pkg.mod", "Box.make", "n", "Make n boxes at once."),
    ]
    description, signature = script.conversations(found[1])
    assert description["messages"] == [
        {"role": "user", "content": "What does `pkg.mod.Box.put` do?"},
        {"role": "assistant", "content": "Put an item in the box."},
    ]
    assert signature["messages"][1]["content"] == "pkg.mod.Box.put(item, /)"


def test_the_split_keeps_evaluation_modules_out_of_training_and_is_deterministic(tmp_path):
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in LIBRARY:
        shutil.copy(lib / f"{name}.py", tmp_path / f"{name}.py")
    shutil.copy(lib / "textwrap.py", tmp_path / "copied.py")  # the same answers, another module
    args = ["--stdlib", str(tmp_path), "--eval-fraction", "0.4"]
    assert script.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert script.main([*args, "--out", str(tmp_path / "b")]) == 0
    lines = {}
    for split in ("train", "eval"):
        text = (tmp_path / "a" / f"{split}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{split}.jsonl").read_text()
        lines[split] = [json.loads(line) for line in text.splitlines()]
    modules = {
        split: {line["messages"][0]["content"].split("`")[1].split(".")[0] for line in found}
        for split, found in lines.items()
    }
    assert modules["train"] and modules["eval"] and not modules["train"] & modules["eval"]
    answers = {
        split: {line["messages"][1]["content"] for line in found} for split, found in lines.items()
    }
    assert not answers["train"] & answers["eval"]
    assert {line["kind"] for line in lines["eval"]} == {"description", "signature"}
