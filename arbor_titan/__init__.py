"""arbor_titan: a composable, native-PyTorch pre-training stack for Llama-style decoders."""

__version__ = "0.1.0"
