"""Built-in growth plugins: the function-preserving operators (and `stack`) and the schedules
that fire them. Importing this package registers them; their API is `arbor_titan.growth`."""

from plugins.growth import operators, schedules  # noqa: F401 - imported to register
