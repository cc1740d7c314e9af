"""The `[context]` section: how the sequence length (and RoPE scaling) changes during training.

[context]
schedule = "warmup"                       # context_schedule plugin
schedule_params = { start_seq_len = 64, steps = 100 }
rope_scaling = "yarn"                     # rope_scaling plugin for the whole run ("" = plain)
rope_params = { factor = 4.0, original_max_seq_len = 256 }
keep_tokens_per_step = true               # shorter sequences, proportionally more of them
"""

from dataclasses import dataclass

from arbor_titan.config.fields import option


@dataclass
class ContextConfig:
    """The `[context]` section."""

    schedule: str = option(
        "constant",
        "context_schedule that sets each step's sequence length: constant, warmup, "
        "stages, or a plugin's name.",
    )
    schedule_params: dict = option({}, "The schedule's parameters, e.g. { steps = 100 }.")
    rope_scaling: str = option(
        "", "rope_scaling plugin applied from step 0: linear, ntk, yarn, llama3 ('' = plain RoPE)."
    )
    rope_params: dict = option({}, "The scaling's parameters, e.g. { factor = 4.0 }.")
    keep_tokens_per_step: bool = option(
        False, "Change the micro-batch with the sequence length so a step keeps its token count."
    )

    def rope_settings(self) -> dict | None:
        """The run's initial scaling as model-args settings; None for plain RoPE."""
        if not self.rope_scaling:
            if self.rope_params:
                raise ValueError("context.rope_params is set but context.rope_scaling is empty")
            return None
        return {"type": self.rope_scaling, **self.rope_params}
