"""XLA compilations: counted, so tests (and the engine's metrics) can prove that
nothing compiles after warm-up; and cached on disk, so a restart warms up fast:
XLA's persistent cache for every compile, and each step shape kept lowered
(`load_or_compile`), so a restart also skips tracing and lowering.

The count includes executables loaded from XLA's cache: either way the step had
to be prepared after warm-up, which is what the count guards against."""

from __future__ import annotations

import threading
import time

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


# ---- lowered steps on disk -----------------------------------------------------------------------
#
# The persistent XLA cache saves the compile, not the tracing and lowering before it, and for
# a model step those take seconds per shape. So each step shape is also kept lowered
# (jax.export's serialized StableHLO, over the flat list of the arguments' arrays): loading it
# back traces nothing, and its compile then comes from the XLA cache. (Whole executables
# could be kept instead, but on the CPU an executable that XLA's cache gave back serializes
# without its kernels.) The key holds everything the lowering depends on: the arguments'
# shapes, dtypes and shardings, the devices, the versions of jax/jaxlib/flax, XLA_FLAGS, the
# source of jaxinfer and its kernels, and whatever the caller names in `identity`.

_source_digest: str | None = None
# Where start-up time went, for the log: steps traced (and lowered) or loaded lowered, and compiling.
stats = {"traced": 0, "trace_seconds": 0.0, "loaded": 0, "load_seconds": 0.0, "compile_seconds": 0.0}


def source_digest() -> str:
    """A digest of the code a step is traced from (jaxinfer/ and pallas_kernels/)."""
    global _source_digest
    if _source_digest is None:
        import hashlib
        import pathlib

        root = pathlib.Path(__file__).resolve().parents[2]  # the repository: jaxinfer/runner/ is two down
        h = hashlib.sha256()
        for package in ("jaxinfer", "pallas_kernels"):
            for path in sorted((root / package).rglob("*.py")):
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


def _lowered_dir():
    import pathlib

    base = jax.config.jax_compilation_cache_dir
    return None if base is None else pathlib.Path(base) / "jaxinfer-lowered"


def load_or_compile(fn, args, out_tree, donate_argnums: tuple[int, ...], identity: str = ""):
    """A compiled `fn(*args)` (a callable taking the same pytrees and returning `out_tree`;
    its `flat` takes and returns the flat lists of leaves):
    from its lowering on disk when this exact one was saved before, else traced, lowered
    and saved. `donate_argnums` as for jax.jit."""
    import hashlib
    import importlib
    import logging
    import os

    import flax
    import jaxlib

    from pallas_kernels import native_cpu

    log = logging.getLogger(__name__)
    leaves, in_tree = jax.tree.flatten(args)
    flat_donate, k = [], 0  # donate_argnums over the flat leaves
    for i, arg_tree in enumerate(in_tree.children()):
        n = arg_tree.num_leaves
        if i in donate_argnums:
            flat_donate.extend(range(k, k + n))
        k += n

    def flat(*xs):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, xs)))

    jitted = jax.jit(flat, donate_argnums=tuple(flat_donate))
    directory = _lowered_dir()
    exported = None
    started = time.monotonic()
    if directory is not None:
        devices = jax.devices()
        key = hashlib.sha256("\n".join([
            jax.__version__, jaxlib.__version__, flax.__version__, os.environ.get("XLA_FLAGS", ""),
            repr(jax.config.jax_enable_x64), repr([(d.platform, d.device_kind, d.id) for d in devices]),
            str(jax.process_count()), source_digest(), identity, repr(in_tree),
            repr([(x.shape, str(x.dtype), repr(getattr(x, "sharding", None))) for x in leaves])]).encode()).hexdigest()
        path = directory / f"{key}.bin"
        if path.is_file():
            try:
                exported = jax.export.deserialize(bytearray(path.read_bytes()))
            except Exception as e:  # truncated, or from another version: lower again
                log.warning("could not load the lowered step %s (%s); tracing it again", path.name, e)
                path.unlink(missing_ok=True)
            if exported is not None and not native_cpu.ready_for(exported):  # its CPU kernel is not built here
                exported = None
        if exported is not None:
            stats["loaded"] += 1
            stats["load_seconds"] += time.monotonic() - started
        else:
            # For the default backend ("cuda", not "gpu"). The native CPU kernels' custom calls are ours: their
            # names change with their arguments, and the key holds the source that calls it.
            # Lowered without the arguments' layouts (the compile below gives them), as the key is.
            plain = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]
            exported = jax.export.export(jitted, disabled_checks=native_cpu.EXPORT_CHECKS)(*plain)
            stats["traced"] += 1
            stats["trace_seconds"] += time.monotonic() - started
            try:
                directory.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(exported.serialize())
                os.replace(tmp, path)  # whole or not at all, even with several processes starting
            except Exception as e:
                log.warning("could not save the lowered step (%s); the next start traces it again", e)
        jitted = jax.jit(exported.call, donate_argnums=tuple(flat_donate))
    started = time.monotonic()
    if jax.default_backend() == "gpu":
        # A step may call Mosaic GPU kernels, whose runtime symbols exist once Mosaic GPU is
        # imported; a step loaded lowered was never traced, so nothing imported it yet.
        importlib.import_module("jax.experimental.mosaic.gpu")
    compiled = jitted.lower(*leaves).compile()
    stats["compile_seconds"] += time.monotonic() - started

    def call(*call_args):
        return jax.tree.unflatten(out_tree, compiled(*jax.tree.leaves(call_args)))
    call.flat = compiled  # over the flat leaves, skipping the pytree work (a hot caller's fast path)
    return call
