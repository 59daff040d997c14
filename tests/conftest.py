import os

# Sharding tests need several devices; on the CPU they are simulated. Must be set
# before jax initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Engines of equal shapes in different tests share compiled steps through the disk cache.
os.environ.setdefault("JAXINFER_XLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer",
                                                         "xla-tests"))

import pathlib  # noqa: E402

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA


@pytest.fixture(scope="session")
def default_model_path():
    from checkpoints.default_model import default_model_path as fetch
    return fetch(progress=False)
