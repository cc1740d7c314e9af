"""Write an instruction set made from this Python's standard library: questions about its
functions, answered from their own docstrings and signatures (docs/sft.md).

    python scripts/make_sft_data.py --out outputs/sft_data

Two questions per documented public function (module level, and methods of public classes):

    What does `textwrap.dedent` do?               → the docstring's first paragraph, one line
    What is the signature of `textwrap.dedent`?   → textwrap.dedent(text)

The split is by top-level module (a stable hash of its name), so no evaluation function is seen
in training, and an evaluation question whose answer a training answer repeats (posixpath.join
and ntpath.join share a docstring) is dropped. Deterministic and fast: the source files are
parsed, never imported, in sorted order. Writes `train.jsonl` and `eval.jsonl` of
`{"kind": ..., "messages": [user, assistant]}` lines. The pre-training corpus (the same
library's source) holds the facts; fine-tuning teaches the format.
"""

import argparse
import ast
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from arbor_titan.data.corpus import unit_hash

# Packages left out: tests, tools and data rather than library functions.
_SKIPPED_PARTS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "__pycache__",
}
MAX_ANSWER_CHARS = 300  # longer first paragraphs are left out: a debug model can't say them


@dataclass(frozen=True)
class Function:
    module: str
    qualname: str  # `dedent`, or `TextWrapper.wrap` for a method
    signature: str  # the parameter list as written, without `self`
    summary: str  # the docstring's first paragraph on one line

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"


def stdlib_modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) of every public library module under `root`, sorted."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or _SKIPPED_PARTS.intersection(parts):
            continue
        if any(part.startswith("_") or not part.isidentifier() for part in parts):
            continue
        yield ".".join(parts), path


def functions(module: str, source: str) -> Iterator[Function]:
    """The documented public functions of a module's source, and its public classes' methods."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for member in node.body:
                yield from _described(module, f"{node.name}.", member)
        else:
            yield from _described(module, "", node)


def _described(module: str, prefix: str, node: ast.AST) -> Iterator[Function]:
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
        return
    summary = _first_paragraph(ast.get_docstring(node) or "")
    if not 10 <= len(summary) <= MAX_ANSWER_CHARS:
        return
    args = node.args
    if (
        prefix
        and args.posonlyargs + args.args
        and (args.posonlyargs + args.args)[0].arg
        in (
            "self",
            "cls",
        )
    ):
        args = _without_first(args)
    yield Function(module, prefix + node.name, ast.unparse(args), summary)


def _without_first(args: ast.arguments) -> ast.arguments:
    """The parameter list without its first parameter (a method's `self` or `cls`)."""
    if args.posonlyargs:
        return ast.arguments(**{**args.__dict__, "posonlyargs": args.posonlyargs[1:]})
    return ast.arguments(**{**args.__dict__, "args": args.args[1:]})


def _first_paragraph(docstring: str) -> str:
    return " ".join(docstring.strip().split("\n\n", 1)[0].split())


def conversations(function: Function) -> list[dict]:
    """The two questions about one function, as chat lines (`kind` names the question for
    scripts/eval_sft.py; training ignores it)."""
    asked = [
        ("description", f"What does `{function.name}` do?", function.summary),
        (
            "signature",
            f"What is the signature of `{function.name}`?",
            f"{function.name}({function.signature})",
        ),
    ]
    return [
        {
            "kind": kind,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for kind, q, a in asked
    ]


def split(found: list[Function], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Train and evaluation lines: whole top-level modules go to evaluation by a stable hash;
    evaluation lines whose answer a training line also gives are dropped."""
    train, held_out = [], []
    for function in found:
        top = function.module.split(".")[0]
        (held_out if unit_hash(top) < eval_fraction else train).extend(conversations(function))
    trained_answers = {line["messages"][-1]["content"] for line in train}
    evaluation = [
        line for line in held_out if line["messages"][-1]["content"] not in trained_answers
    ]
    return train, evaluation


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/sft_data"), help="output folder")
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="share of top-level modules held out for evaluation (default 0.1)",
    )
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="the library folder to read (default: this Python's)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.eval_fraction < 1:
        parser.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if not args.stdlib.is_dir():
        parser.error(f"--stdlib: no such folder {args.stdlib}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found = [
        function
        for module, path in stdlib_modules(args.stdlib)
        for function in functions(module, path.read_text(encoding="utf-8", errors="replace"))
    ]
    train, evaluation = split(found, args.eval_fraction)
    if not train or not evaluation:
        raise SystemExit(
            f"{args.stdlib}: {len(train)} training and {len(evaluation)} evaluation questions; "
            "both must be non-empty (change --eval-fraction)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", train), ("eval", evaluation)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        print(f"{path}: {len(lines)} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
