"""Training: `build(cfg)` makes a Run (everything a run needs), `train(run)` steps it and calls
the hooks (log, checkpoint, evaluate, profile, stop signals, sample, plots)."""

from framework.train.build import Run, build
from framework.train.hooks import Hook, default_hooks
from framework.train.loop import train

__all__ = ["Hook", "Run", "build", "default_hooks", "train"]
