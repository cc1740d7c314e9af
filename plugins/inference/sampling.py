"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Each request owns its own seeded generator, so a seeded request samples the same tokens whether
it runs alone or batched with others.
"""

import random
from dataclasses import dataclass

import torch

# Temperatures below this sample as greedy: a token 0.001 below the top logit already has
# e^-100 of its probability there, and far smaller temperatures overflow `logits / temperature`
# to inf, whose softmax is NaN.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) is greedy (argmax)
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1 keeps every token
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or output
    seed: int | None = None  # None draws a fresh one
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks generate exactly max_new_tokens

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "stop": all(isinstance(s, str) and s for s in self.stop),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"sampling {name}={getattr(self, name)!r} is out of range")

    @property
    def greedy(self) -> bool:
        """Plain argmax: the engine takes all such rows of a step in one batched argmax."""
        return self.temperature < GREEDY_BELOW and self.repetition_penalty == 1.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def sample(
    logits_v: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    seen_v: torch.Tensor | None = None,
) -> int:
    """One token id from fp32 logits (vocab,); `seen_v` marks the tokens the penalty applies to."""
    if params.repetition_penalty != 1.0 and seen_v is not None:
        # CTRL's penalty (Keskar et al. 2019), as in HF: shrink positive logits, grow negative.
        penalized = torch.where(
            logits_v > 0, logits_v / params.repetition_penalty, logits_v * params.repetition_penalty
        )
        logits_v = torch.where(seen_v, penalized, logits_v)
    if params.temperature < GREEDY_BELOW:
        return int(logits_v.argmax())
    logits_v = logits_v / params.temperature
    if 0 < params.top_k < logits_v.shape[0]:
        kth = torch.topk(logits_v, params.top_k).values[-1]
        logits_v = logits_v.masked_fill(logits_v < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_v, order_v = torch.sort(logits_v, descending=True)
        sorted_probs_v = sorted_v.softmax(-1)
        # Drop a token once the tokens before it already reach top_p (the first always stays).
        drop_v = sorted_probs_v.cumsum(-1) - sorted_probs_v >= params.top_p
        logits_v = logits_v.scatter(0, order_v, sorted_v.masked_fill(drop_v, float("-inf")))
    probs_v = logits_v.softmax(-1)
    return int(torch.multinomial(probs_v, 1, generator=generator))
