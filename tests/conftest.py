"""Before jax is imported anywhere in the test session: 8 simulated CPU devices, XLA's backend
at -O0 and a session-wide persistent compilation cache (tests/jax_setup.py says why)."""

import jax_setup

jax_setup.configure()


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # xdist's controller, or the only process
        jax_setup.remove_cache()
