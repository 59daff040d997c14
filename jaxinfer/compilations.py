"""XLA compilations: counted, so tests (and the engine's metrics) can prove that
nothing compiles after warm-up; and cached on disk, so a restart warms up fast.

The count includes executables loaded from the persistent cache: either way the
step had to be prepared after warm-up, which is what the count guards against."""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_installed = False


def _listener(event: str, duration: float, **_) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


def install() -> None:
    """Start counting (idempotent)."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def count() -> int:
    """Backend compilations in this process since install()."""
    return _count


def enable_persistent_cache(directory: str | None = None, min_compile_seconds: float = 0.5) -> str | None:
    """Keep compiled executables on disk, so a restarted engine warms up from the cache.

    Directory: the argument, else $JAXINFER_XLA_CACHE, else ~/.cache/jaxinfer/xla;
    JAXINFER_XLA_CACHE=off disables it. Returns the directory used (None: off)."""
    import os
    import pathlib

    directory = directory or os.environ.get("JAXINFER_XLA_CACHE")
    if directory == "off":
        return None
    if directory is None:
        base = os.environ.get("JAXINFER_CACHE") or pathlib.Path.home() / ".cache" / "jaxinfer"
        directory = str(pathlib.Path(base) / "xla")
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return jax.config.jax_compilation_cache_dir
