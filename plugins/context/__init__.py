"""Built-in adaptive-context plugins: sequence-length schedules and RoPE scalings."""
