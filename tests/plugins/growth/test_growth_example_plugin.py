"""The example plugin, installed as a user would, registers through its entry point alone."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent / "example_plugin"

CHECK = """
import torch
from arbor_titan import registry
from arbor_titan.models.arbor import ArborArgs, Transformer
from arbor_titan.growth import Growth

registry.load_plugins()  # entry points only: nothing names the example's module
print(registry.get("growth_operator", "deepen_last").__name__)
args = ArborArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32)
torch.manual_seed(0)
model = Transformer(args).double()
growth = Growth.create("deepen_last", args, {"count": 2})
grown = Transformer(growth.new_args).double()
grown.load_state_dict(growth.model_state(model.state_dict()))
x = torch.randint(0, 32, (2, 8))
print(growth.new_args.n_layers, float((model(x) - grown(x)).abs().max()))
"""


def test_installed_example_plugin_registers_and_grows_exactly(tmp_path):
    # Built from a copy: pip builds in the source tree and would leave build/ and egg-info there.
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, source)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", CHECK],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    name, summary = result.stdout.split("\n", 1)
    assert name == "DeepenLast"
    n_layers, diff = summary.split()
    assert int(n_layers) == 4 and float(diff) == 0.0
