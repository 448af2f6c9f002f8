"""Before jax is imported anywhere in the test session: 8 simulated CPU devices, XLA's backend
at -O0 and a session-wide persistent compilation cache (tests/jax_setup.py says why).

Files run heaviest first: `--dist loadfile` keeps each file on one worker, so a long file
started last would leave the other worker idle at the end."""

import logging

import jax_setup
import pytest

jax_setup.configure()

# The longest files (CPU seconds on one core, measured with jax 0.10.2); the rest follow in
# collection order. A file missing here only runs later.
HEAVIEST_FIRST = (
    "test_checkpoint.py",  # ~250: a dozen training subprocesses, kill -9 loop, 2-process resume
    "test_sharding.py",  # ~165: one compile per mesh layout, 2-process gloo runs
    "test_train.py",  # ~130
    "test_flash_attention.py",  # ~105
    "test_cross_entropy_kernel.py",  # ~95
    "test_step.py",  # ~70
    "test_readme.py",  # ~70
    "test_signals.py",  # ~65
    "test_multiprocess_faults.py",  # ~60
    "test_transformer.py",  # ~60
    "test_layers.py",  # ~55
    "test_ops_dispatch.py",  # ~50
    "test_gpu_check.py",  # ~50
    "test_integrity.py",  # ~45
    "test_norm_kernels.py",  # ~40
    "test_nonfinite.py",  # ~40
)


def pytest_configure(config):
    # pytest-xdist queues files by their number of tests; 3.8+ can keep the order above
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # xdist's controller, or the only process
        jax_setup.remove_cache()


class _Lines(logging.Handler):
    """Collects messages; attached to the logger itself so that a parent logger with
    propagate=False (scripts/train.py sets one) cannot hide them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def ops_log():
    """The messages framework.ops logs (its registry's logger, at INFO) during the test."""
    from framework.ops import registry

    lines, level = _Lines(), registry.log.level
    registry.log.setLevel(logging.INFO)  # setLevel (not .level =) clears the enabled-for cache
    registry.log.addHandler(lines)
    yield lines.messages
    registry.log.removeHandler(lines)
    registry.log.setLevel(level)
