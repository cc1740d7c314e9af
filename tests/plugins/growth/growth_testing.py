"""Helpers shared by the growth tests: tiny models, growing them, greedy decoding."""

from dataclasses import dataclass

import torch

from arbor_titan.growth import Growth
from arbor_titan.models.arbor import ArborArgs, Transformer


@dataclass(frozen=True)
class HeadDimArgs(ArborArgs):
    """ArborArgs with an explicit head_dim, as add_heads and widen_hidden need (the change asked
    of ArborArgs itself); 0 means dim // n_heads."""

    head_dim: int = 0

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    def validate(self) -> None:
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"bad heads: {self}")


TINY = ArborArgs(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=61, max_seq_len=64
)
TINY_HD = HeadDimArgs(**{k: v for k, v in TINY.__dict__.items()})


def random_model(args: ArborArgs, dtype: torch.dtype = torch.float64, seed: int = 0) -> Transformer:
    """A model whose every parameter is away from its init (gains too), like a trained one."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.mul_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith(("wo.weight", "w2.weight")):
                param.normal_(0, 0.05)  # writers well away from their small init
            elif name == "output.weight" or (args.tie_embeddings and "embed" in name):
                param.normal_(0, 0.3)  # logits of a few units, as in a trained model
    return model.to(dtype)


def build(args: ArborArgs, state: dict, dtype: torch.dtype = torch.float64) -> Transformer:
    model = Transformer(args).to(dtype)
    model.load_state_dict(state)
    return model


def grow(model: Transformer, op: str, params: dict, seed: int = 0) -> tuple[Growth, Transformer]:
    growth = Growth.create(op, model.args, params, seed=seed)
    dtype = next(model.parameters()).dtype
    return growth, build(growth.new_args, growth.model_state(model.state_dict()), dtype)


def batch(vocab: int, size: int = 4, seq: int = 32, seed: int = 1) -> torch.Tensor:
    """Token ids in which every id of the vocabulary occurs (so every embedding row trains)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.arange(vocab), torch.randint(vocab, (size * seq,), generator=generator)])
    return ids[: size * seq].view(size, seq)


@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        next_id = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_id], dim=1)
    return tokens[:, prompt.shape[1] :]
