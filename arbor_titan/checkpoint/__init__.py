"""Checkpoints with torch.distributed.checkpoint: atomic, async, resumable across layouts."""
