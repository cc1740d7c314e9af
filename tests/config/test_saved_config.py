"""The config a run saves (`config.toml` in the run folder and in every checkpoint) loads back
equal, whatever its strings hold; a config file that isn't UTF-8 is named in the error."""

from pathlib import Path

import pytest
import tomllib

from arbor_titan.config.cli import load_config
from arbor_titan.config.loader import ConfigError, to_toml

REPO = Path(__file__).resolve().parents[2]
TRICKY = r'''
[job]
description = """two lines,
"quoted" and back\\slashed, tab\t, unicode é 世界"""

[optimizer]
lr = 1e-5
betas = [0.8, 0.99]

[parallelism]
pipeline_parallel_split_points = [2, 5]

[plugins]
modules = ["my.plugins", "other"]

[growth]
enable = true
schedule = "loss_plateau"
schedule_params = { window = 20, threshold = 1e-3 }

[[growth.stages]]
at_step = 10
op = "deepen"
params = { layers = [1, 3], init = "fresh" }

[[growth.stages]]
at_step = 20
op = "clone_width"
[growth.stages.params]
factor = 2
snr_db = 10.0
nested = { deeper = { list = [1, 2] } }
'''


def round_trip(cfg, tmp_path: Path):
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(cfg))
    return load_config(saved)


def test_a_saved_config_with_newlines_nested_tables_and_lists_loads_back_equal(tmp_path):
    source = tmp_path / "tricky.toml"
    source.write_text(TRICKY)
    cfg = load_config(source)
    assert "\n" in cfg.job.description and cfg.growth.stages[1].params["nested"]
    assert round_trip(cfg, tmp_path) == cfg


@pytest.mark.parametrize(
    "config", sorted((REPO / "train_configs").glob("*.toml")), ids=lambda p: p.name
)
def test_every_shipped_config_saves_and_loads_back_equal(config, tmp_path):
    cfg = load_config(config)
    assert round_trip(cfg, tmp_path) == cfg


def test_saved_config_is_plain_toml_with_one_table_per_section():
    text = to_toml(load_config(None))
    assert tomllib.loads(text)["training"]["steps"] == 200
    assert text.count("[training]") == 1


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[job]\ndescription = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == (
        f"{bad}: not UTF-8 text (byte 0xe9 on line 2); TOML files must be UTF-8"
    )
    child = tmp_path / "child.toml"
    child.write_text('extends = "latin1.toml"\n')
    with pytest.raises(ConfigError, match=f"^{bad}: not UTF-8"):
        load_config(child)
