"""`torch.compile` of the model's blocks (one graph per block: short compiles, reused across
layers) and of the loss."""

from dataclasses import dataclass

from torch import nn

from arbor_titan.config.fields import option

COMPONENTS = ("model", "loss")


@dataclass
class CompileConfig:
    """The `[compile]` section."""

    enable: bool = option(False, "Compile with torch.compile (cache: TORCHINDUCTOR_CACHE_DIR).")
    components: list[str] = option(["model", "loss"], f"What to compile: {', '.join(COMPONENTS)}.")

    def __post_init__(self) -> None:
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown:
            raise ValueError(
                f"compile.components: unknown {unknown}; known: {', '.join(COMPONENTS)}"
            )

    def compiles(self, component: str) -> bool:
        return self.enable and component in self.components


def compile_blocks(blocks: nn.ModuleDict) -> None:
    """Compile each block in place, so parameter names are unchanged."""
    for block in blocks.values():
        block.compile(fullgraph=True)
