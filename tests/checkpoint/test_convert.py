"""Checkpoint conversion: exact round trips, transformers agrees on logits, clean CLI errors."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.distributed.checkpoint as dcp

from arbor_titan import registry
from arbor_titan.checkpoint.convert import (
    ConversionError,
    dcp_to_torch,
    torch_to_dcp,
    write_model_args,
)
from arbor_titan.checkpoint.hf import (
    INDEX_FILE,
    SINGLE_FILE,
    args_from_hf_config,
    dcp_to_hf,
    from_hf_name,
    hf_config,
    hf_to_dcp,
)
from arbor_titan.checkpoint.stateful import ModelState
from arbor_titan.growth import Growth
from arbor_titan.growth.checkpoint import grow_checkpoint
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.model import Transformer
from arbor_titan.models.arbor.rope import RopeScaling, build_rope_scaling, plain_inv_freq
from tests.conftest import dev_dependency

# Without it (outside scripts/test.sh) the round trips and CLI tests still run.
transformers = dev_dependency("transformers")
needs_transformers = pytest.mark.skipif(
    transformers is None, reason="needs transformers (pip install -e .[dev])"
)
# The helpers below save and load in one process on purpose; DCP warns about that every time.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "convert_checkpoint.py"
# GQA (4 query heads share 2 kv heads), untied output; rope_theta off the default so a config
# field that fails to travel shows in the logits.
ARGS = ArborArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=300, max_seq_len=64,
    rope_theta=50000.0, norm_eps=1e-6,
)  # fmt: skip
TIED = replace(ARGS, tie_embeddings=True)
N_WEIGHTS = 2 + 9 * ARGS.n_layers + 1  # embedding, final norm, 9 per layer, output


def make_model(args: ArborArgs, seed: int, qk_scale: float = 1.0) -> Transformer:
    """`qk_scale` multiplies the query and key weights: larger attention logits make the
    positions (RoPE) matter more in the output."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(seed=seed)
    # Norms start at 1; random ones make a swapped norm mapping change the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                param.mul_(qk_scale)
    return model.eval()


def save_checkpoint(model: Transformer, folder: Path, tokenizer: Path | None = None) -> Path:
    dcp.save({"model": ModelState(model)}, checkpoint_id=str(folder), no_dist=True)
    write_model_args(model.args, folder)
    (folder / "config.toml").write_text('[job]\nname = "convert-test"\n')
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder


def load_checkpoint(folder: Path) -> Transformer:
    """Through our own loader, as the trainer's initial_load_path does."""
    args = ArborArgs(**json.loads((folder / "model_args.json").read_text()))
    model = Transformer(args)
    dcp.load({"model": ModelState(model)}, checkpoint_id=str(folder), no_dist=True)
    return model.eval()


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("spm")
    lines = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tok"), vocab_size=80,
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    return folder / "tok.model"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, tuple[Transformer, Path]]:
    """An untied GQA model (with tokenizer) and a tied one, each saved as a DCP checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, args, tok in (("untied", ARGS, tokenizer), ("tied", TIED, None)):
        model = make_model(args, seed=len(out))
        out[name] = (model, save_checkpoint(model, root / name, tok))
    return out


TOKENS = torch.randint(0, ARGS.vocab_size, (2, ARGS.max_seq_len), generator=torch.Generator())


# -- exact round trips


def test_dcp_torch_dcp_round_trip_is_exact(checkpoints, tmp_path):
    model, src = checkpoints["untied"]
    lines = []
    dcp_to_torch(src, tmp_path / "w.pt", emit=lines.append)
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert list(state) == list(model.state_dict())  # our names, no "model." prefix, our order
    assert len(lines) == N_WEIGHTS and lines[-1].startswith(f"[{N_WEIGHTS}/{N_WEIGHTS}] read")

    torch_to_dcp(tmp_path / "w.pt", tmp_path / "back", like=src)
    assert_same_weights(model, load_checkpoint(tmp_path / "back"))
    for side in ("model_args.json", "config.toml", "tokenizer.model"):
        assert (tmp_path / "back" / side).read_bytes() == (src / side).read_bytes()


def test_torch_to_dcp_with_model_args_file(checkpoints, tmp_path):
    model, src = checkpoints["tied"]
    dcp_to_torch(src, tmp_path / "w.pt")
    assert "output.weight" not in torch.load(tmp_path / "w.pt", weights_only=True)
    torch_to_dcp(tmp_path / "w.pt", tmp_path / "back", model_args=src / "model_args.json")
    assert_same_weights(model, load_checkpoint(tmp_path / "back"))
    assert not (tmp_path / "back" / "config.toml").exists()


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_dcp_hf_dcp_round_trip_is_exact(checkpoints, tmp_path, variant):
    model, src = checkpoints[variant]
    # Shards of ~40 kB force the multi-file layout with an index.
    dcp_to_hf(src, tmp_path / "hf", max_shard_bytes=40_000)
    assert (tmp_path / "hf" / INDEX_FILE).is_file()
    lines = []
    hf_to_dcp(tmp_path / "hf", tmp_path / "back", emit=lines.append)
    assert len(lines) == len(model.state_dict())
    assert_same_weights(model, load_checkpoint(tmp_path / "back"))


# -- the real client: transformers


def hf_logits(folder: Path, attn: str) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation=attn).eval()
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    with torch.no_grad():
        return hf(TOKENS).logits


@needs_transformers
@pytest.mark.parametrize(
    "variant, attn", [("untied", "sdpa"), ("untied", "eager"), ("tied", "sdpa")]
)
def test_transformers_reads_export_with_equal_logits(checkpoints, tmp_path, variant, attn):
    model, src = checkpoints[variant]
    dcp_to_hf(src, tmp_path / "hf")
    assert (tmp_path / "hf" / SINGLE_FILE).is_file()
    with torch.no_grad():
        ours = model(TOKENS)
    assert ours.abs().max() > 0.1  # logits big enough for 1e-5 to be a real test
    torch.testing.assert_close(hf_logits(tmp_path / "hf", attn), ours, atol=1e-5, rtol=0)


@needs_transformers
def test_export_config_and_tokenizer(checkpoints, tmp_path, tokenizer):
    _, src = checkpoints["untied"]
    dcp_to_hf(src, tmp_path / "hf", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert (config["num_key_value_heads"], config["head_dim"]) == (2, 16)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert args_from_hf_config(config, tmp_path) == ARGS
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


@needs_transformers
@pytest.mark.parametrize(
    "tie, rope",
    [
        (False, None),
        (True, None),
        (False, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    ],
)
def test_transformers_model_imports_with_equal_logits(tmp_path, tie, rope):
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=20000.0, tie_word_embeddings=tie, rope_parameters=rope,
    )  # fmt: skip
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
        expected = hf(TOKENS).logits
    hf.save_pretrained(tmp_path / "hf")
    hf_to_dcp(tmp_path / "hf", tmp_path / "dcp")
    ours = load_checkpoint(tmp_path / "dcp")
    assert ours.args.tie_embeddings == tie and ours.args.rope_theta == 20000.0
    if rope is not None:
        assert ours.args.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), expected, atol=1e-5, rtol=0)


# Each longer than its original length (TOKENS has 64 positions), with non-default params where
# transformers' defaults would hide a param that fails to travel.
SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    "ntk": {"type": "ntk", "factor": 4.0},
    "dynamic_ntk": {"type": "dynamic_ntk", "factor": 2.0, "original_max_seq_len": 16},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16, "beta_fast": 8.0},
    "llama3": {
        "type": "llama3", "factor": 4.0, "original_max_seq_len": 16,
        "low_freq_factor": 0.5, "high_freq_factor": 8.0,
    },
}  # fmt: skip


def imported_args(args: ArborArgs) -> ArborArgs:
    """What an export of `args` imports back as: the scaling with every param written out;
    ntk as the plain RoPE it equals; dynamic_ntk trained at its original length (transformers
    reads that from max_position_embeddings)."""
    scaling = build_rope_scaling(args.rope_scaling)
    params = {k: v for k, v in asdict(scaling.params).items() if v is not None}
    name = args.rope_scaling["type"]
    if name == "ntk":
        theta = args.rope_theta * params["factor"] ** (args.head_dim / (args.head_dim - 2))
        return replace(args, rope_scaling=None, rope_theta=pytest.approx(theta, rel=1e-12))
    args = replace(args, rope_scaling={"type": name, **params})
    return (
        replace(args, max_seq_len=params["original_max_seq_len"]) if name == "dynamic_ntk" else args
    )


@needs_transformers
@pytest.mark.parametrize("name", SCALINGS)
def test_scaled_model_exports_with_equal_logits_and_imports_back(name, tmp_path):
    args = replace(ARGS, rope_scaling=SCALINGS[name])
    model = make_model(args, seed=5, qk_scale=8.0)
    dcp_to_hf(save_checkpoint(model, tmp_path / "dcp"), tmp_path / "hf")
    with torch.no_grad():
        ours, plain = model(TOKENS), make_model(ARGS, seed=5, qk_scale=8.0)(TOKENS)
    assert (ours - plain).abs().max() > 0.1  # the scaling changes the logits
    torch.testing.assert_close(hf_logits(tmp_path / "hf", "sdpa"), ours, atol=1e-5, rtol=0)

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert args_from_hf_config(config, tmp_path) == imported_args(args)
    if name != "dynamic_ntk":  # back at 16 positions, too few for TOKENS
        hf_to_dcp(tmp_path / "hf", tmp_path / "back")
        with torch.no_grad():
            torch.testing.assert_close(load_checkpoint(tmp_path / "back")(TOKENS), ours)


@registry.register("rope_scaling", "test_convert_halved")
class HalvedFrequencies(RopeScaling):
    """A user's scaling that transformers has no rope_type for."""

    def inv_freq(self, head_dim: int, theta: float, length: int) -> torch.Tensor:
        return plain_inv_freq(head_dim, theta) / 2


def test_a_scaling_transformers_lacks_is_not_exported(tmp_path):
    model = make_model(replace(ARGS, rope_scaling={"type": "test_convert_halved"}), seed=0)
    src = save_checkpoint(model, tmp_path / "dcp")
    with pytest.raises(ConversionError) as err:
        dcp_to_hf(src, tmp_path / "hf")
    assert str(err.value).startswith(f"{src / 'model_args.json'}: RoPE scaling ")
    assert "'test_convert_halved' has no transformers equivalent (exported: ntk, linear" in str(
        err.value
    )
    assert not (tmp_path / "hf").exists()


# add_heads on ARGS: one more GQA group, 6 heads of 16 over dim 64.
MORE_HEADS = replace(ARGS, n_heads=6, n_kv_heads=3, head_dim=16)


def test_a_shape_transformers_refuses_is_not_exported_and_the_fix_is_named(tmp_path):
    src = save_checkpoint(make_model(MORE_HEADS, seed=0), tmp_path / "dcp")
    with pytest.raises(ConversionError) as err:
        dcp_to_hf(src, tmp_path / "hf")
    message = str(err.value)
    assert message.startswith(f"{src / 'model_args.json'}: dim=64 is not a multiple of n_heads=6")
    assert "grow_checkpoint.py SRC WIDE --op widen_hidden --param dim=66" in message
    assert not (tmp_path / "hf").exists()


@needs_transformers
def test_transformers_refuses_that_shape_and_loads_the_named_fix_with_equal_logits(tmp_path):
    # A ValueError inside huggingface_hub's validation error.
    with pytest.raises(Exception, match="is not a multiple of the number of attention heads"):
        transformers.LlamaConfig(
            hidden_size=64, num_attention_heads=6, num_key_value_heads=3, head_dim=16
        )
    model = make_model(MORE_HEADS, seed=0)
    src = save_checkpoint(model, tmp_path / "dcp")
    grow_checkpoint(
        src, tmp_path / "wide", lambda args: Growth.create("widen_hidden", args, {"dim": 66}),
        log=lambda _: None,
    )  # fmt: skip
    dcp_to_hf(tmp_path / "wide", tmp_path / "hf")
    with torch.no_grad():
        ours = model(TOKENS)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", "sdpa"), ours, atol=1e-5, rtol=0)


def test_export_writes_transformers_key_names(tmp_path):
    config = hf_config(replace(ARGS, rope_scaling=SCALINGS["yarn"]), torch.float32, None)
    expected = {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 8.0, "beta_slow": 1.0, "truncate": True,
    }  # fmt: skip
    assert config["rope_scaling"] == expected
    assert config["rope_parameters"] == {**expected, "rope_theta": ARGS.rope_theta}
    assert config["max_position_embeddings"] == ARGS.max_seq_len
    plain = hf_config(ARGS, torch.float32, None)
    assert plain["rope_scaling"] is None and plain["rope_parameters"]["rope_type"] == "default"


# -- refusals


@pytest.mark.parametrize(
    "change, named",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}, "longrope"),
        ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}, "proportional"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.factor"),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling.factor must be >= 1"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "beta": 1}}, "rope_scaling.beta"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"model_type": "mistral"}, "mistral"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
    ],
)
def test_unsupported_hf_configs_are_refused(change, named, tmp_path):
    config = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
    }  # fmt: skip
    assert args_from_hf_config(config, tmp_path).n_kv_heads == 4
    with pytest.raises(ConversionError, match=named) as err:
        args_from_hf_config(config | change, tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(err.value)


def test_explicit_head_dim_is_carried_over(tmp_path):
    config = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "head_dim": 32,
    }  # fmt: skip
    assert args_from_hf_config(config, tmp_path).head_dim == 32


def test_unknown_missing_and_misshapen_keys_are_named(checkpoints, tmp_path):
    model, src = checkpoints["untied"]
    dcp_to_torch(src, tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    bad = dict(state, **{"layers.0.attention.wq.bias": torch.zeros(64)})
    del bad["norm.weight"]
    bad["output.weight"] = torch.zeros(301, 64)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ConversionError) as err:
        torch_to_dcp(tmp_path / "bad.pt", tmp_path / "out", like=src)
    message = str(err.value)
    for part in ("bad.pt", "unknown keys layers.0.attention.wq.bias", "missing keys norm.weight"):
        assert part in message
    assert "output.weight has shape (301, 64)" in message
    assert not (tmp_path / "out").exists()

    from safetensors.torch import save_file

    dcp_to_hf(src, tmp_path / "hf")
    tensors = {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="unknown keys .*q_proj.bias"):
        hf_to_dcp(tmp_path / "hf", tmp_path / "out")
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_damaged_checkpoint_and_existing_output_are_refused(checkpoints, tmp_path):
    _, src = checkpoints["tied"]
    with pytest.raises(ConversionError, match="already exists"):
        dcp_to_hf(src, src)
    damaged = save_checkpoint(checkpoints["tied"][0], tmp_path / "damaged")
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ConversionError, match="truncated"):
        dcp_to_hf(damaged, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".*tmp"))


# -- the command line


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", ["dcp-to-torch", "torch-to-dcp", "dcp-to-hf", "hf-to-dcp"])
def test_cli_help(cli, command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "OUT" in capsys.readouterr().out


def test_cli_converts_with_progress(cli, checkpoints, tmp_path, capsys):
    _, src = checkpoints["untied"]
    assert cli.main(["dcp-to-hf", str(src), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert f"[{N_WEIGHTS}/{N_WEIGHTS}] convert output.weight (300, 64) float32" in out


def test_cli_bad_folder_is_a_clean_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "dcp-to-hf", str(missing), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line
