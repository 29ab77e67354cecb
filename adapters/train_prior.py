"""Stage 1 entry script: ``accelerate launch [--config_file adapters/accelerate/...] adapters/train_prior.py
--config configs/stage1_prior.yaml [--resume latest] [section.key=value ...]``. The logic lives in fusion_diff."""

import sys

from fusion_diff.cli.failures import run_cli
from fusion_diff.cli.train import main_for_task

if __name__ == "__main__":
    sys.exit(run_cli(main=lambda argv: main_for_task("prior", argv), prog="train_prior.py"))
