import os

# Sharding tests need several devices; on the CPU they are simulated. Must be set
# before jax initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Engines of equal shapes in different tests share compiled steps through the disk cache.
os.environ.setdefault("JAXINFER_XLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer",
                                                         "xla-tests"))

import gc  # noqa: E402
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


# An engine's compiled steps are freed only by Python's cyclic collector (jax's executables sit in
# reference cycles), and on the CPU each holds hundreds of memory mappings (one set per compiled kernel:
# a tiny engine with a draft model has 14,000). Left to the collector's own pace, engines of finished tests
# piled up past the kernel's limit of 65,530 mappings per process and XLA crashed mid-compile. So after any
# test that compiled something, and after each module (its fixtures' engines), collect at once.
@pytest.fixture(autouse=True)
def _free_finished_engines():
    from jaxinfer.runner import compilations

    before = compilations.count()
    yield
    if compilations.count() != before:
        gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _free_module_engines():
    yield
    gc.collect()
