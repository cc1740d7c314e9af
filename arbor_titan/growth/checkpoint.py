"""Offline growth of a DCP checkpoint folder, one source tensor in memory at a time.

Nothing is loaded up front: the output's layout is planned on the meta device from the source's
metadata, and DCP's writer asks for each grown tensor only when it writes it
(`SavePlanner.lookup_object`), which loads that tensor's source alone and grows it. Entries that
are neither weights nor optimizer state (train state, lr schedule, data position, RNG) are copied
unchanged, so a run can resume from the grown folder.
"""

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from arbor_titan.checkpoint.convert import MetadataOnceReader
from arbor_titan.checkpoint.folders import MODEL_ARGS_FILE, read_model_args, write_model_args
from arbor_titan.growth.apply import Growth
from arbor_titan.models.arbor.args import ArborArgs

MODEL, STATE, GROUPS = "model.", "optimizer.state.", "optimizer.param_groups."
# Plain files beside the weights that a grown checkpoint keeps (see CheckpointManager._publish).
COPIED_FILES = ("config.toml", "tokenizer.model")


def grow_checkpoint(
    src: Path,
    out: Path,
    make_growth: Callable[[ArborArgs], Growth],
    log: Callable[[str], None] = print,
) -> Growth:
    """Write `out`: the checkpoint `src` grown by `make_growth(src's args)`, model and optimizer."""
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output folder exists and is not empty")
    growth = make_growth(read_model_args(src))
    source = _GrowingSource(src, growth, log)
    log(
        f"growing {src} -> {out}: {len(source.sources)} entries, "
        f"{growth.args.n_layers} -> {growth.new_args.n_layers} layers, "
        f"dim {growth.args.dim} -> {growth.new_args.dim}"
    )
    # One file per tensor: DCP's writer keeps every tensor of a file alive until the file closes.
    dcp.save(
        source.placeholders,
        storage_writer=FileSystemWriter(out, single_file_per_rank=False),
        planner=_LazySavePlanner(source),
        no_dist=True,
    )
    write_model_args(growth.new_args, out)
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    log(f"wrote {out} ({MODEL_ARGS_FILE}: {growth.new_args})")
    return growth


class _GrowingSource:
    """Maps every output key to its source key and grows sources on demand (last one cached)."""

    def __init__(self, src: Path, growth: Growth, log: Callable[[str], None]):
        self.src, self.growth, self.log = src, growth, log
        self.reader = MetadataOnceReader(src)
        self.metadata = self.reader.read_metadata().state_dict_metadata
        self.sources = list(self.metadata)
        self.placeholders: dict[str, Any] = {}
        self.origin: dict[str, str] = {}
        for key in self.sources:
            for out_key, placeholder in self._plan(key).items():
                self.placeholders[out_key] = placeholder
                self.origin[out_key] = key
        self._cached_key: str | None = None
        self._cached: dict[str, Any] = {}
        self._done = 0

    def __call__(self, out_key: str) -> Any:
        key = self.origin[out_key]
        if key != self._cached_key:
            self._cached, self._cached_key = self._grow(key), key
            self._done += 1
            self.log(f"[{self._done}/{len(self.sources)}] {key} -> {len(self._cached)} entries")
        return self._cached[out_key]

    def _plan(self, key: str) -> dict[str, Any]:
        """Output keys made from source `key`, with meta tensors of their shapes."""
        info = self.metadata[key]
        param, prefix, state_key = _split(key)
        if (
            prefix == GROUPS
        ):  # a parameter's group settings: every parameter made from it shares them
            return {
                f"{GROUPS}{name}{state_key}": _placeholder(info)
                for name in self.growth.output_shapes(param)
            }
        if param is None:
            return {key: _placeholder(info)}
        dtype = info.properties.dtype
        shapes = self.growth.output_shapes(param)
        return {
            f"{prefix}{name}{state_key}": torch.empty(
                () if state_key == ".step" else shape, dtype=dtype, device="meta"
            )
            for name, shape in shapes.items()
        }

    def _grow(self, key: str) -> dict[str, Any]:
        value = self._load(key)
        param, prefix, state_key = _split(key)
        if prefix == GROUPS:
            return {
                f"{GROUPS}{name}{state_key}": value for name in self.growth.output_shapes(param)
            }
        if param is None:
            return {key: value}
        if prefix == MODEL:
            grown = self.growth.grow_param(param, value)
        else:
            grown = self.growth.grow_state_entry(param, state_key[1:], value)
        return {f"{prefix}{name}{state_key}": tensor for name, tensor in grown.items()}

    def _load(self, key: str) -> Any:
        info = self.metadata[key]
        box = {
            key: None
            if isinstance(info, BytesStorageMetadata)
            else torch.empty(info.size, dtype=info.properties.dtype)
        }
        dcp.load(box, storage_reader=self.reader, no_dist=True)
        return box[key]


def _split(key: str) -> tuple[str | None, str, str]:
    """(parameter name, prefix, suffix) of a weight, optimizer-state or (flattened, per
    parameter) param-group key; (None, "", "") for anything else."""
    if key.startswith(MODEL):
        return key[len(MODEL) :], MODEL, ""
    for prefix in (STATE, GROUPS):
        if key.startswith(prefix):
            param, _, suffix = key[len(prefix) :].rpartition(".")
            return param, prefix, f".{suffix}"
    return None, "", ""


def _placeholder(info: Any) -> Any:
    """What DCP's planner needs to plan an entry: None for bytes, else a meta tensor."""
    if isinstance(info, BytesStorageMetadata):
        return None
    return torch.empty(info.size, dtype=info.properties.dtype, device="meta")


class _LazySavePlanner(DefaultSavePlanner):
    """Plans with meta placeholders; hands the writer each real tensor only when it asks."""

    def __init__(self, source: _GrowingSource):
        super().__init__()
        self.source = source

    def lookup_object(self, index: MetadataIndex) -> Any:
        return self.source(index.fqn)
