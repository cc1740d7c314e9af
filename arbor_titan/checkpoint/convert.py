"""Model weights out of and into DCP checkpoints, and the machinery every converter shares.

A training checkpoint is a DCP folder holding the weights under `model.<param name>` beside
optimizer, data and RNG state, plus `model_args.json`, `config.toml` and `tokenizer.model`.
Conversion reads only the `model.` entries, so the optimizer never enters memory. Here:

- `dcp_to_torch` / `torch_to_dcp`: one consolidated `{param name: tensor}` file, for tools that
  want a single `torch.load(path, weights_only=True)`.
- The Hugging Face Llama layout lives in `hf.py` and uses the same readers and writers.

Memory: a DCP folder is read one tensor at a time; DCP is written from memory-mapped tensors
(`torch.load(mmap=True)`, safetensors), so the page cache holds them, not the process. Only the
consolidated torch file holds every weight at once, because `torch.save` takes a whole dict.

Security: user files are read with `torch.load(weights_only=True)`, safetensors or DCP. Note
that DCP itself unpickles a folder's `.metadata` without restriction (torch 2.13), so a DCP
folder must come from someone you trust, like any training checkpoint.
"""

import io
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem

from arbor_titan.checkpoint import folders
from arbor_titan.checkpoint.folders import (
    CONFIG_FILE,
    MODEL_ARGS_FILE,
    TOKENIZER_FILE,
    find_damage,
    write_model_args,
)
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.model import Transformer

MODEL_PREFIX = "model."

Emit = Callable[[str], None]


class ConversionError(Exception):
    """An input or output a conversion can't use; the message names the file or key."""


class TensorProgress:
    """One line per tensor, e.g. `[ 3/29] read layers.0.attention.wq.weight (64, 64) float32`."""

    def __init__(self, verb: str, total: int, emit: Emit | None):
        self.verb, self.total, self.emit, self.done = verb, total, emit, 0

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.done += 1
        if self.emit is not None:
            width = len(str(self.total))
            self.emit(
                f"[{self.done:>{width}}/{self.total}] {self.verb} {name} "
                f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
            )


# -- model shape


def read_model_args(path: Path) -> ArborArgs:
    """ArborArgs from a `model_args.json` file, as a conversion error when it's unusable."""
    try:
        return folders.read_model_args(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from err


def expected_shapes(args: ArborArgs) -> dict[str, torch.Size]:
    """Every weight of the model `args` describe, in the model's order; built on meta (free)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def check_shapes(found: Mapping[str, torch.Size], args: ArborArgs, source: Path) -> None:
    """Fail unless `found` names exactly the model's weights, each with the model's shape."""
    expected = expected_shapes(args)
    problems = []
    if unknown := [n for n in found if n not in expected]:
        problems.append(f"unknown keys {some_names(unknown)}")
    if missing := [n for n in expected if n not in found]:
        problems.append(f"missing keys {some_names(missing)}")
    problems += [
        f"{name} has shape {tuple(found[name])}, the model args say {tuple(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    ][:5]
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


def some_names(names: list[str], limit: int = 5) -> str:
    """The first few of `names` for an error message, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# -- reading DCP


@contextmanager
def _single_process() -> Iterator[None]:
    """Conversion is one process by design; DCP warns about that on every call, so hush it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class MetadataOnceReader(FileSystemReader):
    """A reader that unpickles `.metadata` once, however many single-tensor loads follow.

    A 400B checkpoint's metadata lists every shard of every optimizer state (large); loading
    a thousand tensors one by one must not read it a thousand times.
    """

    def __init__(self, path: Path):
        super().__init__(path)
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class DcpWeights:
    """The model weights of one DCP checkpoint folder, loaded one tensor at a time."""

    def __init__(self, folder: Path):
        if not folder.exists():
            raise ConversionError(f"{folder}: no such checkpoint folder")
        if not (folder / ".metadata").is_file():
            raise ConversionError(f"{folder}: not a DCP checkpoint (no .metadata file)")
        if damage := find_damage(folder):
            raise ConversionError(damage)
        self.folder = folder
        self.args = read_model_args(folder / MODEL_ARGS_FILE)
        self._reader = MetadataOnceReader(folder)
        entries = self._reader.read_metadata().state_dict_metadata
        self.specs: dict[str, TensorStorageMetadata] = {}
        for key, meta in entries.items():
            if not key.startswith(MODEL_PREFIX):
                continue
            if not isinstance(meta, TensorStorageMetadata):
                raise ConversionError(f"{folder}: {key} is not a tensor")
            self.specs[key.removeprefix(MODEL_PREFIX)] = meta
        if not self.specs:
            raise ConversionError(f"{folder}: no model weights (no '{MODEL_PREFIX}*' entries)")
        check_shapes({n: m.size for n, m in self.specs.items()}, self.args, folder)
        # The model's own order (embedding, layers 0..n, norm, output), not DCP's.
        self.names = list(expected_shapes(self.args))

    def nbytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        meta = self.specs[name]
        return meta.size.numel() * (dtype or meta.properties.dtype).itemsize

    def load(self, name: str) -> torch.Tensor:
        meta = self.specs[name]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with _single_process():
            dcp.load({MODEL_PREFIX + name: tensor}, storage_reader=self._reader, no_dist=True)
        return tensor

    def iter_tensors(
        self, names: list[str], progress: TensorProgress
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            tensor = self.load(name)
            progress(name, tensor)
            yield name, tensor


# -- writing


class _ReportingSavePlanner(DefaultSavePlanner):
    """DCP's default planner, reporting each tensor as the writer asks for its data."""

    def __init__(self, progress: TensorProgress):
        super().__init__()
        self._progress = progress

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        data = super().resolve_data(write_item)
        self._progress(write_item.index.fqn.removeprefix(MODEL_PREFIX), data)
        return data


def save_dcp(tensors: dict[str, torch.Tensor], folder: Path, emit: Emit | None) -> None:
    """Write `tensors` as the `model.` entries of a new DCP checkpoint in `folder`."""
    progress = TensorProgress("write", len(tensors), emit)
    with _single_process():
        dcp.save(
            {"model": tensors},
            storage_writer=FileSystemWriter(folder),
            planner=_ReportingSavePlanner(progress),
            no_dist=True,
        )


@contextmanager
def new_output(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write into, renamed to `path` only when complete.

    A conversion that fails half-way then leaves nothing that looks like a finished output.
    """
    if path.exists():
        raise ConversionError(f"{path}: already exists; remove it or choose another output")
    if not path.parent.is_dir():
        raise ConversionError(f"{path.parent}: no such folder for the output {path.name}")
    temp = path.with_name(f".{path.name}.tmp")
    _remove(temp)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        _remove(temp)


def copy_side_files(src: Path, out: Path, names: tuple[str, ...]) -> None:
    """Copy those of `names` that exist in folder `src` into folder `out`."""
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# -- the consolidated torch file


def dcp_to_torch(src: Path, out: Path, emit: Emit | None = None) -> None:
    """Write the model weights of DCP folder `src` to one `torch.save` file `out`."""
    weights = DcpWeights(src)
    progress = TensorProgress("read", len(weights.names), emit)
    state = dict(weights.iter_tensors(weights.names, progress))
    with new_output(out) as temp:
        torch.save(state, temp)


def load_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """A `{name: tensor}` file, memory-mapped, without running any pickled code."""
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input to name
        raise ConversionError(f"{path}: not a torch weights file ({type(err).__name__})") from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{path}: expected a dict of parameter name -> tensor")
    return state


def torch_to_dcp(
    src: Path,
    out: Path,
    like: Path | None = None,
    model_args: Path | None = None,
    emit: Emit | None = None,
) -> None:
    """Write consolidated weights `src` as a DCP folder `out` that our loaders accept.

    The shape comes from `like` (a DCP folder whose model_args.json, config.toml and
    tokenizer.model are copied along) or from a `model_args` file; exactly one is needed.
    """
    if (like is None) == (model_args is None):
        raise ConversionError("torch_to_dcp needs exactly one of `like` and `model_args`")
    args_path = like / MODEL_ARGS_FILE if like is not None else model_args
    args = read_model_args(args_path)
    state = load_torch_weights(src)
    check_shapes({n: t.shape for n, t in state.items()}, args, src)
    with new_output(out) as temp:
        save_dcp(state, temp, emit)
        write_model_args(args, temp)
        if like is not None:
            copy_side_files(like, temp, (CONFIG_FILE, TOKENIZER_FILE))
