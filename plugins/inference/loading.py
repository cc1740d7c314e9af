"""Load a model for inference from any of the project's weight layouts, in one process or
split across processes (tensor parallel, see tensor_parallel.py).

- a DCP checkpoint folder (`step-N/`, from any training layout: FSDP, TP, PP);
- a consolidated `.pt` file of `{param name: tensor}` (shape from `model_args.json`);
- a Hugging Face Llama folder (`config.json` + safetensors).

The files are read with the checkpoint converters' readers (`arbor_titan.checkpoint.convert`,
`.hf`), so the name map and the checks live in one place. The model is built on meta,
materialized with `to_empty` and filled from the weights: no random init is computed only to
be overwritten.
"""

import functools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh

from arbor_titan.checkpoint.convert import ConversionError, check_shapes, load_torch_weights
from arbor_titan.checkpoint.folders import (
    MODEL_ARGS_FILE,
    TOKENIZER_FILE,
    complete_checkpoints,
    read_model_args,
)
from arbor_titan.checkpoint.hf import (
    CONFIG_JSON,
    args_from_hf_config,
    folder_tokenizer,
    read_hf_tensors,
)
from arbor_titan.checkpoint.stateful import ModelState
from arbor_titan.config.loader import ConfigError
from arbor_titan.data.tokenizer import Tokenizer, load_tokenizer
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.model import Transformer
from arbor_titan.registry import PluginError
from plugins.inference import tensor_parallel
from plugins.inference.rope import RopeOverride, context_length

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a bad path, file, --engine name or RoPE scaling raises; scripts report these as one-line
# errors.
LOAD_ERRORS = (OSError, ValueError, ConversionError, PluginError, ConfigError)


@dataclass
class LoadedModel:
    """A model ready for inference and the tokenizer it was trained with."""

    model: Transformer
    tokenizer: Tokenizer
    source: Path

    @property
    def args(self) -> ArborArgs:
        return self.model.args


def newest_checkpoint(root: Path) -> Path:
    """The newest complete `step-N/` folder under `root`; a clear error if there is none."""
    found = complete_checkpoints(Path(root))
    if not found:
        raise FileNotFoundError(
            f"no checkpoint in {root}: train one first with ./run_train.sh (the debug model "
            "saves to outputs/debug/checkpoints), or pass --checkpoint PATH"
        )
    return found[-1][1]


def load_model(
    path: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    model_args: Path | None = None,
    tokenizer: Path | None = None,
    mesh: DeviceMesh | None = None,
    rope: RopeOverride | None = None,
) -> LoadedModel:
    """Load `path` (a DCP folder, an HF folder or a `.pt` file). `model_args` (a JSON file or a
    folder holding `model_args.json`) and `tokenizer` override what is found beside the weights;
    `rope` changes the checkpoint's RoPE scaling. With a `mesh`, each process loads its
    tensor-parallel shard.
    """
    path = Path(path)
    fill: Callable[[Transformer], None]
    if path.is_dir() and (path / ".metadata").is_file():
        args_file = _args_file(model_args, path)
        args = read_model_args(args_file)
        fill = functools.partial(_load_dcp, source=path)
    elif path.is_dir() and (path / CONFIG_JSON).is_file():
        args_file = path / CONFIG_JSON
        args = args_from_hf_config(json.loads(args_file.read_text()), args_file)
        read = functools.partial(read_hf_tensors, path, args)  # reads only tie_embeddings
        fill = functools.partial(_fill, read=read, source=path)
    elif path.is_file():
        args_file = _args_file(model_args, path.parent)
        args = read_model_args(args_file)
        fill = functools.partial(
            _fill, read=functools.partial(load_torch_weights, path), source=path
        )
    else:
        raise FileNotFoundError(
            f"{path}: not a checkpoint (expected a DCP folder with .metadata, a Hugging Face "
            "folder with config.json + model.safetensors, or a .pt weights file)"
        )
    if rope is not None:
        args = rope.apply(args)
    model = _empty_model(args, device, mesh)
    fill(model)
    model.to(dtype=dtype).eval()
    # The model's own forward evaluates a length-dependent scaling for every position the model
    # is meant for, its scaling's extension included.
    model.rope_length = context_length(model.args)
    found = folder_tokenizer(args_file.parent) or args_file.parent / TOKENIZER_FILE
    tokenizer_file = Path(tokenizer) if tokenizer else found
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file}: missing tokenizer (pass --tokenizer PATH)")
    return LoadedModel(model, load_tokenizer(tokenizer_file), path)


def _args_file(model_args: Path | None, default_dir: Path) -> Path:
    """`model_args.json` in `default_dir`, or the given JSON file or folder holding one."""
    given = Path(model_args) if model_args is not None else default_dir
    return given / MODEL_ARGS_FILE if given.is_dir() else given


def _empty_model(
    args: ArborArgs, device: torch.device | str, mesh: DeviceMesh | None
) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    if mesh is not None:
        tensor_parallel.shard(model, mesh)
    return model.to_empty(device=device)


def _load_dcp(model: Transformer, source: Path) -> None:
    with warnings.catch_warnings():  # one process loading on purpose
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load({"model": ModelState(model)}, checkpoint_id=str(source))


def _fill(model: Transformer, read: Callable[[], dict[str, torch.Tensor]], source: Path) -> None:
    """Copy the whole tensors `read` returns into the model (this process's shard of them)."""
    state = read()
    check_shapes({name: t.shape for name, t in state.items()}, model.args, source)
    if tensor_parallel.process_group(model) is None:
        model.load_state_dict(state)
    else:
        tensor_parallel.fill_from_whole(model, state)
