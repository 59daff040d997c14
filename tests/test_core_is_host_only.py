"""jaxinfer.core is host policy: importing every module of it in a fresh interpreter
loads neither jax nor anything else that touches a device."""

import pathlib
import subprocess
import sys

import jaxinfer.core

CORE = pathlib.Path(jaxinfer.core.__file__).parent


def test_core_imports_without_jax():
    modules = sorted(f"jaxinfer.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    assert {"jaxinfer.core.scheduler", "jaxinfer.core.page_pool", "jaxinfer.core.request",
            "jaxinfer.core.sampling_params"} <= set(modules)
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax'})\n"
            + "print(','.join(heavy))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"jaxinfer.core pulled in {run.stdout.strip()}"
