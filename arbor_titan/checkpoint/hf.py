"""Hugging Face Llama folders (`config.json` + safetensors) to and from our DCP checkpoints.

An Arbor model is a Llama: the weights only change names (see `_TOP_NAMES`, `_LAYER_NAMES`).
No q/k permutation is needed: our RoPE rotates halves (feature i pairs with i + head_dim/2),
which is Hugging Face's `rotate_half`, so wq/wk rows are already in HF's order. Meta's original
Llama checkpoints (and TorchTitan's) rotate interleaved pairs (2i, 2i+1) and need HF's
`permute` on conversion; ours do not. tests/checkpoint/test_convert.py proves it: the exported
model's logits in `transformers` equal ours, and a `transformers` model imports with equal logits.
A RoPE scaling travels as transformers' `rope_parameters` (see `hf_rope_parameters`). The
tokenizer travels with a `tokenizer_config.json` naming BOS/EOS and holding the chat template
(docs/sft.md), so `apply_chat_template` renders conversations as the trainer does.

Export writes one `model.safetensors`, or HF's sharded layout with an index when the weights
exceed `max_shard_bytes`; only one shard is in memory at a time (with safetensors' serialized
copy: 0.5 GB shards of the 799m model peaked at 1.5 GiB). Import memory-maps the safetensors
files, so it needs little memory beyond the page cache.
"""

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFModel

from arbor_titan.checkpoint.convert import (
    ConversionError,
    DcpWeights,
    Emit,
    TensorProgress,
    check_shapes,
    new_output,
    save_dcp,
    some_names,
    write_model_args,
)
from arbor_titan.checkpoint.folders import MODEL_ARGS_FILE, TOKENIZER_FILE
from arbor_titan.config.loader import ConfigError
from arbor_titan.data.chat_template import JINJA_TEMPLATE
from arbor_titan.data.hf_tokenizer import HFTokenizer
from arbor_titan.data.tokenizer import Tokenizer, load_tokenizer
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.rope import build_rope_scaling, check_rope_scaling, scaling_name

CONFIG_JSON = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A Hugging Face folder's tokenizer when it has no sentencepiece `tokenizer.model` (Llama 3's).
HF_TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"

# The shard size transformers used by default through v4: small enough for hub uploads and for
# one shard to sit in memory while it is written.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_FROM_HF_TOP = {hf: ours for ours, hf in _TOP_NAMES.items()}
_FROM_HF_LAYER = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
# Older transformers saved RoPE's inverse frequencies; they follow from config.json.
_HF_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _rename(name: str, top: dict, layer: dict, pattern: re.Pattern, prefix: str) -> str | None:
    if name in top:
        return top[name]
    match = pattern.fullmatch(name)
    if match and match[2] in layer:
        return f"{prefix}{match[1]}.{layer[match[2]]}.weight"
    return None


def to_hf_name(name: str) -> str | None:
    """`layers.0.attention.wq.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    return _rename(name, _TOP_NAMES, _LAYER_NAMES, _OUR_LAYER, "model.layers.")


def from_hf_name(name: str) -> str | None:
    """The inverse of `to_hf_name`; None for a name that isn't part of a Llama."""
    return _rename(name, _FROM_HF_TOP, _FROM_HF_LAYER, _HF_LAYER, "layers.")


# -- RoPE scaling

# Our rope_scaling plugins that transformers implements, by its rope_type. Their params keep their
# names except the pre-extension length (ORIGINAL_LENGTH), which transformers calls
# HF_ORIGINAL_LENGTH; `ntk` has no rope_type and is written as the plain RoPE it equals.
_HF_ROPE_TYPES = {"linear": "linear", "dynamic_ntk": "dynamic", "yarn": "yarn", "llama3": "llama3"}
_FROM_HF_ROPE_TYPES = {hf: ours for ours, hf in _HF_ROPE_TYPES.items()}
ORIGINAL_LENGTH = "original_max_seq_len"
HF_ORIGINAL_LENGTH = "original_max_position_embeddings"


def hf_rope_parameters(args: ArborArgs) -> tuple[dict, int]:
    """transformers' `rope_parameters` for the args' RoPE (every param written out, defaults
    included) and the `max_position_embeddings` to go with them.

    Two scalings change shape on the way: a fixed NTK-aware scaling is plain RoPE with a larger
    base, written as that (it imports back as plain RoPE with that base); transformers' dynamic
    NTK takes its original length from `max_position_embeddings`, so that is what `dynamic_ntk`
    writes there (and reads back as the training length).
    """
    try:
        scaling = build_rope_scaling(args.rope_scaling)
    except ConfigError as err:
        raise ConversionError(str(err)) from err
    plain = {"rope_type": "default", "rope_theta": args.rope_theta}
    name = scaling_name(args.rope_scaling)
    if scaling is None:
        return plain, args.max_seq_len
    if name == "ntk":
        # Plain RoPE's θ_1 = base^(-2/d) gives the base back.
        inv_freq = scaling.inv_freq(args.head_dim, args.rope_theta, args.max_seq_len)
        return {**plain, "rope_theta": float(inv_freq[1]) ** (-args.head_dim / 2)}, args.max_seq_len
    if name not in _HF_ROPE_TYPES:
        raise ConversionError(
            f"RoPE scaling {name!r} has no transformers equivalent (exported: "
            f"{', '.join(['ntk', *_HF_ROPE_TYPES])})"
        )
    params = {key: value for key, value in asdict(scaling.params).items() if value is not None}
    rope = {"rope_type": _HF_ROPE_TYPES[name], "rope_theta": args.rope_theta, **params}
    if name == "dynamic_ntk":
        return rope, rope.pop(ORIGINAL_LENGTH)
    if ORIGINAL_LENGTH in rope:
        rope[HF_ORIGINAL_LENGTH] = rope.pop(ORIGINAL_LENGTH)
    return rope, args.max_seq_len


def rope_from_hf_config(config: dict, path: Path) -> tuple[float, dict | None]:
    """The RoPE base and our scaling settings (None: plain) for a Llama config.json, read as
    transformers v5 does: `rope_scaling` when set, else `rope_parameters`. A rope_type we don't
    implement (longrope, ...) is refused by name."""
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = dict(config.get(key) or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rotary_fraction = rope.pop("partial_rotary_factor", config.get("partial_rotary_factor"))
    if rotary_fraction not in (None, 1, 1.0):
        raise ConversionError(f"{path}: partial_rotary_factor={rotary_fraction} is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type not in _FROM_HF_ROPE_TYPES:
        supported = ", ".join(["default", *_FROM_HF_ROPE_TYPES])
        raise ConversionError(
            f"{path}: {key}.rope_type {rope_type!r} is not supported (supported: {supported})"
        )
    name = _FROM_HF_ROPE_TYPES[rope_type]
    settings = {"type": name, **rope}
    max_positions = config.get("max_position_embeddings", 2048)
    if HF_ORIGINAL_LENGTH in settings:
        settings[ORIGINAL_LENGTH] = settings.pop(HF_ORIGINAL_LENGTH)
    if name == "dynamic_ntk":
        settings[ORIGINAL_LENGTH] = max_positions
    elif name != "linear":  # transformers' default for yarn and llama3
        settings.setdefault(ORIGINAL_LENGTH, max_positions)
    try:
        check_rope_scaling(settings, key)
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from err
    return theta, settings


# -- config.json


def check_llama_heads(args: ArborArgs) -> None:
    """transformers' LlamaConfig (v5) refuses a hidden size that is not a multiple of the head
    count, even with `head_dim` given and although its attention would compute such a model.
    `add_heads` makes one (the debug model: dim 128, 6 heads of 32), so it is refused before
    anything is written, naming the exact growth that gives the same model an exportable shape."""
    if args.dim % args.n_heads:
        dim = -(-args.dim // args.n_heads) * args.n_heads
        raise ConversionError(
            f"dim={args.dim} is not a multiple of n_heads={args.n_heads} (head_dim="
            f"{args.head_dim}): transformers' LlamaConfig refuses such a model, so it can't be "
            f"exported. widen_hidden to a multiple of {args.n_heads} keeps the model's outputs "
            "exactly and exports: python scripts/grow_checkpoint.py SRC WIDE --op widen_hidden "
            f"--param dim={dim}, then convert WIDE"
        )


def folder_tokenizer(folder: Path) -> Path | None:
    """A checkpoint's or Hugging Face folder's tokenizer file: `tokenizer.model` (which in our
    checkpoints may hold a tokenizer.json), else `tokenizer.json`; None when it has neither."""
    for name in (TOKENIZER_FILE, HF_TOKENIZER_JSON):
        if (folder / name).is_file():
            return folder / name
    return None


def hf_config(args: ArborArgs, dtype: torch.dtype, tokenizer: Tokenizer | None) -> dict:
    """LlamaConfig's fields for `args`; bos/eos ids come from the tokenizer when there is one."""
    check_llama_heads(args)
    rope, max_positions = hf_rope_parameters(args)
    without_theta = {key: value for key, value in rope.items() if key != "rope_theta"}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        # transformers v5 reads rope_parameters (or rope_scaling first, when it is set);
        # earlier versions read rope_theta and rope_scaling.
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None if rope["rope_type"] == "default" else without_theta,
        "rope_parameters": rope,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    return config


def args_from_hf_config(config: dict, path: Path) -> ArborArgs:
    """ArborArgs for a Llama config.json; features an Arbor model lacks are refused by name."""
    if config.get("model_type") != "llama":
        raise ConversionError(f"{path}: model_type {config.get('model_type')!r}, only 'llama'")
    for key, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, wanted) != wanted:
            raise ConversionError(f"{path}: {key}={config[key]!r} is not supported ({wanted!r})")
    rope_theta, rope_scaling = rope_from_hf_config(config, path)
    try:
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        args = ArborArgs(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            ffn_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            tie_embeddings=config.get("tie_word_embeddings", False),
            max_seq_len=config.get("max_position_embeddings", 2048),
            head_dim=config.get("head_dim") or 0,
            rope_scaling=rope_scaling,
        )
    except KeyError as err:
        raise ConversionError(f"{path}: missing {err.args[0]!r}") from err
    try:
        args.validate()
    except ValueError as err:
        raise ConversionError(f"{path}: {err}") from err
    return args


# -- export


def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive names grouped so each group stays under `max_bytes` (or is one tensor)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def dcp_to_hf(
    src: Path,
    out: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    emit: Emit | None = None,
) -> None:
    """Write the model of DCP folder `src` as a Hugging Face Llama folder `out`.

    `dtype` casts the weights (e.g. bfloat16 to halve the download); None keeps them exact.
    """
    weights = DcpWeights(src)
    sizes = {name: weights.nbytes(name, dtype) for name in weights.names}
    shards = _plan_shards(sizes, max_shard_bytes)
    files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    tokenizer_file = folder_tokenizer(src)
    tokenizer = load_tokenizer(tokenizer_file) if tokenizer_file else None
    saved_dtype = dtype or weights.specs[weights.names[0]].properties.dtype
    try:  # before any weight is written: a shape or scaling transformers lacks stops it
        config = hf_config(weights.args, saved_dtype, tokenizer)
    except ConversionError as err:
        raise ConversionError(f"{src / MODEL_ARGS_FILE}: {err}") from err
    progress = TensorProgress("convert", len(weights.names), emit)
    weight_map = {}
    with new_output(out) as temp:
        temp.mkdir()
        for file, names in zip(files, shards):
            shard = {
                to_hf_name(name): tensor if dtype is None else tensor.to(dtype)
                for name, tensor in weights.iter_tensors(names, progress)
            }
            save_file(shard, temp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (temp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (temp / CONFIG_JSON).write_text(json.dumps(config, indent=2))
        if tokenizer is not None:  # under the name transformers looks for, by its kind
            name = HF_TOKENIZER_JSON if isinstance(tokenizer, HFTokenizer) else TOKENIZER_FILE
            shutil.copyfile(tokenizer.path, temp / name)
            config_text = json.dumps(tokenizer_config(tokenizer), indent=2)
            (temp / TOKENIZER_CONFIG_JSON).write_text(config_text)


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json: BOS/EOS by name and the chat template, so that `transformers`'
    `apply_chat_template` renders a conversation as the trainer and the server do."""
    if isinstance(tokenizer, HFTokenizer):
        name = HFModel.from_file(str(tokenizer.path)).id_to_token
    else:
        name = spm.SentencePieceProcessor(model_file=str(tokenizer.path)).id_to_piece
    return {
        "bos_token": name(tokenizer.bos_id),
        "eos_token": name(tokenizer.eos_id),
        "chat_template": JINJA_TEMPLATE,
    }


# -- import


def _safetensors_files(folder: Path) -> list[Path]:
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    elif list(folder.glob("*.bin")):
        raise ConversionError(
            f"{folder}: only safetensors weights are read (pickled .bin files can run code); "
            "re-save with save_pretrained(safe_serialization=True)"
        )
    else:
        raise ConversionError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    for file in files:
        if not file.is_file():
            raise ConversionError(f"{file}: missing (named by {folder / INDEX_FILE})")
    return files


def read_hf_tensors(folder: Path, args: ArborArgs) -> dict[str, torch.Tensor]:
    """Every weight under our names, memory-mapped; unknown names are an error."""
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    for file in _safetensors_files(folder):
        handle = safe_open(file, framework="pt")
        for hf_name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
            ours = from_hf_name(hf_name)
            # A tied model reads the embedding; HF may still have stored lm_head as a copy.
            if _HF_DERIVED.fullmatch(hf_name) or (ours == "output.weight" and args.tie_embeddings):
                continue
            if ours is None:
                unknown.append(f"{hf_name} (in {file.name})")
            elif ours in tensors:
                raise ConversionError(f"{file}: {hf_name} is stored twice")
            else:
                tensors[ours] = handle.get_tensor(hf_name)
    if unknown:
        raise ConversionError(f"{folder}: unknown keys (not part of a Llama) {some_names(unknown)}")
    return tensors


def hf_to_dcp(src: Path, out: Path, emit: Emit | None = None) -> None:
    """Write the Hugging Face Llama folder `src` as a DCP checkpoint folder `out`."""
    if not src.is_dir():
        raise ConversionError(f"{src}: no such Hugging Face model folder")
    config_path = src / CONFIG_JSON
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: missing (not a Hugging Face model folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_path}: not JSON ({err})") from err
    args = args_from_hf_config(config, config_path)
    tensors = read_hf_tensors(src, args)
    check_shapes({name: t.shape for name, t in tensors.items()}, args, src)
    with new_output(out) as temp:
        save_dcp(tensors, temp, emit)
        write_model_args(args, temp)
        tokenizer_file = folder_tokenizer(src)
        if tokenizer_file is not None:  # a tokenizer.json comes along as our tokenizer.model
            shutil.copyfile(tokenizer_file, temp / TOKENIZER_FILE)
