"""The built-in growth operators; importing this package registers them (formulas: GROWTH.md)."""

from plugins.growth.operators import (  # noqa: F401 - imported to register
    add_heads,
    clone_width,
    deepen,
    stack,
    widen_ffn,
    widen_hidden,
)
