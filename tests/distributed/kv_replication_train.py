"""Train like `python -m arbor_titan.train`, with one more flavor, `debug_kv6`: 12 query heads
over 6 kv heads (head_dim 8), so tensor parallel degree 4 splits the query heads but must
replicate the kv projections (models/arbor/parallelize.py `ReplicatedKV`)."""

import sys

from arbor_titan.models.arbor.args import FLAVORS, ArborArgs
from arbor_titan.train import main

FLAVORS["debug_kv6"] = ArborArgs(
    dim=96, n_layers=2, n_heads=12, n_kv_heads=6, ffn_dim=256, vocab_size=512
)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
