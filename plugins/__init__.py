"""arbor_titan's built-in plugins. Each registers through the `arbor_titan.plugins` entry-point
group, exactly as a user's own package would (see plugins/README.md)."""
