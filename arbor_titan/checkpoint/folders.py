"""The on-disk protocol: `step-N/` folders are complete by construction.

Ranks write into `.step-N.tmp/`; only when every rank has finished does rank 0 rename it to
`step-N/` (an atomic rename). A crash mid-write leaves a `.tmp` folder, which is never loaded and
is removed at the next start.
"""

import json
import os
import re
import shutil
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from arbor_titan.models.arbor.args import ArborArgs, args_to_dict

STEP_FOLDER = re.compile(r"^step-(\d+)$")
# Plain files beside the DCP shards: what a reader needs without the run folder.
CONFIG_FILE = "config.toml"
MODEL_ARGS_FILE = "model_args.json"
TOKENIZER_FILE = "tokenizer.model"


def read_model_args(path: Path) -> ArborArgs:
    """The model args a checkpoint was saved with: its folder's `model_args.json`, or that file."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_ARGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; cannot tell the checkpoint's model shape")
    try:
        args = ArborArgs(**json.loads(path.read_text()))
        args.validate()
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not valid model args ({err})") from err
    return args


def write_model_args(args: ArborArgs, folder: Path) -> None:
    (Path(folder) / MODEL_ARGS_FILE).write_text(json.dumps(args_to_dict(args), indent=2))


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def temp_folder(root: Path, step: int) -> Path:
    return root / f".step-{step}.tmp"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_FOLDER.match(p.name))]
    return sorted(found)


def remove_stale_temp_folders(root: Path) -> list[Path]:
    stale = [p for p in root.glob(".step-*.tmp")] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish(temp: Path, final: Path) -> None:
    """Make `temp` the complete checkpoint `final`, replacing an older save of the same step."""
    if final.exists():
        retired = final.with_name(f".{final.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(temp, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temp, final)


def prune(root: Path, keep_latest_k: int) -> list[Path]:
    """Delete all but the newest `keep_latest_k` complete checkpoints (0 keeps everything)."""
    if keep_latest_k <= 0:
        return []
    doomed = [path for _, path in complete_checkpoints(root)[:-keep_latest_k]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def find_damage(folder: Path) -> str | None:
    """The first problem that would make `folder` fail to load, naming the file; else None.

    Checks DCP's metadata and that every byte range it points to exists on disk, so a truncated
    or missing shard is found before any state is overwritten by a partial load.
    """
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unreadable metadata is damage to report
        return f"{folder / '.metadata'}: unreadable ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    for relative, size in sorted(needed.items()):
        path = folder / relative
        if not path.is_file():
            return f"{path}: missing"
        actual = path.stat().st_size
        if actual < size:
            return f"{path}: truncated ({actual:,} bytes, needs {size:,})"
    return None
