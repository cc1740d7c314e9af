"""The built-in growth operators; importing this package registers them.

Their math, and why the exact ones keep the logits: docs/growth.md.
"""

from plugins.growth.operators import (  # noqa: F401 - imported to register
    add_heads,
    clone_width,
    deepen,
    stack,
    widen_ffn,
    widen_hidden,
)
