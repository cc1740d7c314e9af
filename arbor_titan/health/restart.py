"""What a restarted job (torchrun `--max-restarts`, `MAX_RESTARTS` of run_train.sh) says first."""

import logging
import os

# Set by torchrun's elastic agent for every worker it starts.
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
MAX_RESTARTS_ENV = "TORCHELASTIC_MAX_RESTARTS"

logger = logging.getLogger("arbor_titan")


def log_restart_notice(checkpoint_enabled: bool) -> None:
    """Say how a restart continues, when restarts are allowed.

    A restart resumes from the newest complete checkpoint (the checkpoint manager's default);
    without checkpoints it would silently start over, which deserves a warning.
    """
    count = int(os.environ.get(RESTART_COUNT_ENV, "0"))
    allowed = int(os.environ.get(MAX_RESTARTS_ENV, "0"))
    if allowed == 0:
        return
    if not checkpoint_enabled:
        logger.warning(
            "restart %d of at most %d with checkpoint.enable=false: a restart trains from step 0",
            count,
            allowed,
        )
    elif count == 0:
        logger.info("up to %d restarts, each from the newest complete checkpoint", allowed)
    else:
        logger.info("restart %d of at most %d: resuming from the newest checkpoint", count, allowed)
