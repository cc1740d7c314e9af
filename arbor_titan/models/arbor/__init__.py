"""The Arbor model family: a Llama-style decoder (RMSNorm, SwiGLU, GQA, RoPE)."""

from arbor_titan.models.arbor.args import FLAVORS, ArborArgs, ModelConfig, resolve_args
from arbor_titan.models.arbor.model import Transformer, count_params

__all__ = ["FLAVORS", "ArborArgs", "ModelConfig", "Transformer", "count_params", "resolve_args"]
