"""Arbor model dimensions and the named flavors, from a laptop-sized debug model to 400B."""

from dataclasses import dataclass, fields, replace

from arbor_titan.config.fields import option


@dataclass
class ModelConfig:
    """The `[model]` section: which family and flavor, with optional per-key overrides."""

    name: str = option("arbor", "Model family; 'arbor' is the Llama-style decoder.")
    flavor: str = option("debug", "Named size: debug, bench, growth_large, 799m, 200b, 400b.")
    norm_eps: float = option(1e-5, "RMSNorm epsilon.", gt=0)
    rope_theta: float = option(10000.0, "RoPE base frequency.", gt=0)
    tie_embeddings: bool = option(False, "Share the token embedding with the output projection.")


@dataclass(frozen=True)
class ArborArgs:
    """Everything needed to build an Arbor model; frozen so a flavor can't be edited in place."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    # Explicit so width growth (add_heads, widen_hidden) can keep it fixed while dim or n_heads
    # change; 0 means dim // n_heads, resolved on construction.
    head_dim: int = 0
    # RoPE scaling settings, e.g. {"type": "yarn", "factor": 4.0, "original_max_seq_len": 4096}
    # (a `rope_scaling` plugin and its params); None is plain RoPE. See models/arbor/rope.py.
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        # Resolved here so the stored value survives `dataclasses.replace` and model_args.json.
        if self.head_dim == 0 and self.n_heads > 0 and self.dim % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    def validate(self) -> None:
        """Fail before anything is built when the dims can't form a model."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0:
            raise ValueError(
                f"model n_heads={self.n_heads} must divide dim={self.dim} "
                f"(head_dim would be {self.dim / self.n_heads:g}); or set head_dim explicitly"
            )
        if self.head_dim < 0:
            raise ValueError(f"model head_dim must be positive, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(grouped-query attention shares each kv head across a whole group)"
            )
        if self.head_dim % 2:
            raise ValueError(f"model head_dim={self.head_dim} must be even for RoPE")


# vocab_size here is the flavor's intended vocabulary; a trained tokenizer's real size replaces
# it at build time (see `resolve_args`).
FLAVORS: dict[str, ArborArgs] = {
    # Trains visibly in well under a minute on a 2-core CPU.
    "debug": ArborArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=2000),
    # `debug` grown by clone_width ×2 then deepen ×2: the from-scratch arm of
    # scripts/bench_growth.py, so both arms of that benchmark end in exactly this shape.
    "growth_large": ArborArgs(
        dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=2000
    ),
    # The CPU benchmark model: 16.8M parameters with vocab 8000 and an untied output.
    "bench": ArborArgs(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_dim=1024, vocab_size=8000),
    # The research model: Llama-like proportions (head_dim 128, GQA 3:1, FFN 3.25·dim rounded to
    # a multiple of 128 for GPU tiles) giving 801.4M parameters with a 32k vocabulary, untied.
    "799m": ArborArgs(
        dim=1536, n_layers=24, n_heads=12, n_kv_heads=4, ffn_dim=4992, vocab_size=32000
    ),
    "200b": ArborArgs(
        dim=12288, n_layers=96, n_heads=96, n_kv_heads=12, ffn_dim=49152, vocab_size=128256
    ),
    "400b": ArborArgs(
        dim=16384, n_layers=120, n_heads=128, n_kv_heads=16, ffn_dim=65536, vocab_size=128256
    ),
}


def resolve_args(
    cfg: ModelConfig, vocab_size: int | None = None, max_seq_len: int = 4096
) -> ArborArgs:
    """The flavor's args with the config's overrides and the tokenizer's real vocabulary."""
    if cfg.name != "arbor":
        raise ValueError(f"model.name: unknown model family {cfg.name!r}; known: 'arbor'")
    if cfg.flavor not in FLAVORS:
        raise ValueError(
            f"model.flavor: unknown flavor {cfg.flavor!r}; known: {', '.join(FLAVORS)}"
        )
    args = replace(
        FLAVORS[cfg.flavor],
        norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_embeddings=cfg.tie_embeddings,
        max_seq_len=max_seq_len,
    )
    if vocab_size is not None:
        args = replace(args, vocab_size=vocab_size)
    args.validate()
    return args


def args_to_dict(args: ArborArgs) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(args)}
