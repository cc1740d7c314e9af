"""Built-in adaptive-context plugins: sequence-length schedules and RoPE scalings."""

from plugins.context import rope_scalings, schedules  # noqa: F401 - imported to register
