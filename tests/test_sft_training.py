"""Fine-tuning with train_configs/debug_sft.toml on chat data: the loss is the mean over the
answer tokens of the whole step, so gradient accumulation and data parallelism equal one large
batch, and a resumed run equals an uninterrupted one."""

import importlib.util
import json
import logging
import shutil
import signal
import sysconfig
from pathlib import Path

import pytest

from arbor_titan import train
from arbor_titan.data import DataConfig, TokenizerConfig, build_dataloader, prepare_data
from arbor_titan.models.arbor.loss import counted_labels
from tests.conftest import FAST_TRAINING, REPO, run_training, step_metrics
from tests.plugins.inference.tiny import train_tokenizer

spec = importlib.util.spec_from_file_location("make_sft_data", REPO / "scripts/make_sft_data.py")
make_sft_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_sft_data)

MODULES = ("textwrap", "string", "fnmatch", "shlex", "glob")


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tokenizer and questions about a few stdlib modules (make_sft_data.py's)."""
    folder = tmp_path_factory.mktemp("sft")
    lib = Path(sysconfig.get_paths()["stdlib"])
    lines = [
        line
        for module in MODULES
        for function in make_sft_data.functions(module, (lib / f"{module}.py").read_text())
        for line in make_sft_data.conversations(function)
    ]
    data = folder / "chat.jsonl"
    data.write_text("".join(f"{json.dumps(line)}\n" for line in lines))
    return train_tokenizer(folder / "tokenizer.model"), data


@pytest.fixture
def in_process(sft_inputs):
    """Train debug_sft.toml in this process (no interpreter start-up per run), restoring the
    logging and SIGTERM handling that a run sets up."""
    tokenizer, data = sft_inputs
    logger = logging.getLogger("arbor_titan")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    sigterm = signal.getsignal(signal.SIGTERM)

    def run(dump_folder: Path, job: str, *overrides: str) -> None:
        argv = [str(REPO / "train_configs" / "debug_sft.toml"), f"--job.dump_folder={dump_folder}"]
        argv += [f"--job.name={job}", *FAST_TRAINING, *sft_overrides(tokenizer, data), *overrides]
        assert train.main(argv) == 0

    yield run
    logger.handlers[:], logger.level, logger.propagate = saved
    signal.signal(signal.SIGTERM, sigterm)


def sft_overrides(tokenizer: Path, data: Path) -> list[str]:
    return [
        f"--tokenizer.path={tokenizer}",
        f"--data.paths=['{data}']",
        "--data.val_fraction=0",
        "--checkpoint.initial_load_path=",
        "--metrics.enable_tensorboard=false",
    ]


def test_accumulation_data_parallelism_and_resume_equal_one_large_batch(
    sft_inputs, in_process, tmp_path
):
    # Steps 1-2 read the same 8 windows each layout: 4 per step as one batch, as 2 accumulated
    # micro-batches of 2, or as 2 ranks of 2. Their answer-token counts differ, so a loss
    # normalized per micro-batch would differ from the step's mean.
    tokenizer, data = sft_inputs
    cfg = DataConfig(source="chat", paths=[str(data)], val_fraction=0, document_mask=True)
    prepared = prepare_data(cfg, TokenizerConfig(path=str(tokenizer)), tmp_path, False)
    loader = build_dataloader(prepared, "train", 64, 2, 0, 1, seed=0)
    counts = [int(counted_labels(next(loader)[1])) for _ in range(2)]
    assert counts[0] != counts[1], counts

    one_batch = ["--training.steps=4", "--checkpoint.interval=2"]
    in_process(tmp_path, "one", *one_batch)
    no_save = ["--training.steps=2", "--checkpoint.enable=false", "--training.local_batch_size=2"]
    in_process(tmp_path, "accum", *no_save, "--training.gradient_accumulation_steps=2")
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step-2", resumed / "step-2")
    in_process(tmp_path, "resumed", *one_batch)
    config = "debug_sft.toml"
    run_training(tmp_path, "dp", *sft_overrides(*sft_inputs), *no_save, nproc=2, config=config)

    one = step_metrics(tmp_path, "one")
    for job, steps in (("accum", (1, 2)), ("dp", (1, 2)), ("resumed", (3, 4))):
        got = step_metrics(tmp_path, job)
        assert sorted(got) == list(steps), job
        for step in steps:
            for key in ("loss", "grad_norm"):
                assert got[step][key] == pytest.approx(one[step][key], rel=1e-6), (job, step)
