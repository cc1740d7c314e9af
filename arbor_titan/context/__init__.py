"""Adaptive context: sequence-length schedules and RoPE scalings chosen from the `[context]`
section. The API lives here; the built-ins are plugins in plugins/context/."""
