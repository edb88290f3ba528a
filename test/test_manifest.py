"""Verified model rollout: the manifest (write, check, what a bad copy looks like), its CLI, and the memory check."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import CHECKPOINTS
from mobilevlm_ros import manifest as mf
from mobilevlm_ros.cli.manifest import main as manifest_cli

MODEL = CHECKPOINTS / "MobileVLM_V2-tiny"


@pytest.fixture()
def model(tmp_path):
    copy = tmp_path / "MobileVLM_V2-tiny"
    shutil.copytree(MODEL, copy)
    (copy / "sub").mkdir()
    (copy / "sub" / "extra.json").write_text("{}")
    (copy / ".cache").mkdir()
    (copy / ".cache" / "ignored").write_text("hidden files are not part of a model")
    mf.write_manifest(copy)
    return copy


def test_write_lists_relative_names_sizes_and_hashes(model):
    document = json.loads((model / mf.MANIFEST_NAME).read_text())
    names = [e["path"] for e in document["files"]]
    assert names == sorted(names) and "sub/extra.json" in names and "pytorch_model.bin" in names
    assert mf.MANIFEST_NAME not in names and not any(n.startswith(".") for n in names)
    weights = next(e for e in document["files"] if e["path"] == "pytorch_model.bin")
    assert weights["size"] == (model / "pytorch_model.bin").stat().st_size
    assert weights["sha256"] == mf.sha256_file(model / "pytorch_model.bin")
    assert document["total_bytes"] == sum(e["size"] for e in document["files"])
    summary = mf.check_manifest(model)
    assert summary.files == len(names) and summary.total_bytes == document["total_bytes"]


def test_truncated_file_is_refused_by_size_without_hashing(model, monkeypatch):
    weights = model / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])  # a half-copied file
    monkeypatch.setattr(mf, "sha256_file", lambda p: pytest.fail("hashed although a size was already wrong"))
    with pytest.raises(mf.ManifestError) as e:
        mf.check_manifest(model)
    assert e.value.path == str(weights)
    assert "size 1000 bytes" in e.value.problem and "half-copied" in e.value.problem


def test_corrupted_file_same_size_is_refused_by_hash(model):
    weights = model / "pytorch_model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x01
    weights.write_bytes(bytes(data))
    mf.check_manifest(model, hash_files=False)  # sizes alone cannot see it
    with pytest.raises(mf.ManifestError, match=r"pytorch_model\.bin: sha256 .* differs from the manifest"):
        mf.check_manifest(model)


def test_missing_and_unlisted_files_are_named(model):
    (model / "tokenizer.model").unlink()
    (model / "model.safetensors").write_bytes(b"not verified")
    with pytest.raises(mf.ManifestError) as e:
        mf.check_manifest(model)
    assert e.value.path.endswith("tokenizer.model") and "missing" in e.value.problem
    assert "model.safetensors (not in the manifest)" in str(e.value)


def test_no_or_broken_manifest(tmp_path, model):
    assert not mf.has_manifest(tmp_path)
    with pytest.raises(mf.ManifestError, match="no manifest"):
        mf.check_manifest(tmp_path)
    (model / mf.MANIFEST_NAME).write_text('{"format": 1, "files": [{"path": "../etc/passwd", "size": 1, '
                                          '"sha256": "x"}]}')
    with pytest.raises(mf.ManifestError, match="invalid file name"):
        mf.check_manifest(model)
    (model / mf.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(mf.ManifestError, match="not a valid manifest"):
        mf.check_manifest(model)


def test_cli_write_check_and_exit_codes(tmp_path, capsys):
    copy = tmp_path / "m"
    shutil.copytree(MODEL, copy)
    assert manifest_cli(["check", str(copy)]) == 2  # no manifest yet
    assert manifest_cli(["write", str(copy)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"] == 6
    assert manifest_cli(["write", str(copy)]) == 2  # never silently re-blesses a copy
    assert manifest_cli(["check", str(copy)]) == 0
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert manifest_cli(["check", str(copy), "--sizes-only"]) == 1
    assert "config.json: size" in capsys.readouterr().err
    assert manifest_cli(["write", str(copy), "--force"]) == 0
    # The console script runs without ROS and without torch.
    out = subprocess.run([sys.executable, "-c", "import sys; from mobilevlm_ros.cli.manifest import main; "
                          "r = main(['check', sys.argv[1]]); assert 'torch' not in sys.modules; sys.exit(r)",
                          str(copy)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# --- memory ------------------------------------------------------------------------------------------------------
def test_estimate_from_weight_files_dtype_and_kv_cache():
    config = json.loads((MODEL / "config.json").read_text())
    weights = (MODEL / "pytorch_model.bin").stat().st_size
    full = mf.estimate_model_memory(MODEL, "float32", 2048)
    assert full.weights_bytes == weights  # the checkpoint is float32
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert full.kv_cache_bytes == 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2048 * 4
    half = mf.estimate_model_memory(MODEL, "float16", 10**6)
    assert half.weights_bytes == weights // 2
    assert half.positions == config["max_position_embeddings"]  # the decoder caps the cache there too
    assert half.kv_cache_bytes == full.kv_cache_bytes // 2
    assert full.total_bytes == full.weights_bytes + full.kv_cache_bytes + full.overhead_bytes
    batched = mf.estimate_model_memory(MODEL, "float32", 2048, batch=4)  # max_batch rows, each its own cache row
    assert batched.kv_cache_bytes == 4 * full.kv_cache_bytes and "x 4 rows" in batched.describe()


def test_memory_check_refuses_with_numbers():
    estimate = mf.MemoryEstimate(weights_bytes=3 << 30, kv_cache_bytes=1 << 29, overhead_bytes=1 << 28,
                                 dtype="float16", positions=2048)
    line = mf.check_memory(estimate, 8 << 30, 1 << 30, "MemAvailable")
    assert "3.75 GiB" in line and "7.00 GiB usable" in line
    with pytest.raises(mf.MemoryCheckError) as e:
        mf.check_memory(estimate, 4 << 30, 1 << 30, "MemAvailable")
    message = str(e.value)
    assert "refusing to load" in message and "weights 3.00 GiB as float16" in message
    assert "KV cache 512.0 MiB for 2048 positions" in message and "3.00 GiB usable" in message
    assert "memory_reserve_mb 1024" in message and "short by 768.0 MiB" in message
    assert "skipped" in mf.check_memory(estimate, None, 0, "MemAvailable unknown")


def test_mem_available_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:    2048 kB\n")
    assert mf.read_mem_available(meminfo) == 2048 * 1024
    assert mf.read_mem_available(tmp_path / "absent") is None
    available, where = mf.available_memory("cpu")
    assert available is None or available > 0 and "MemAvailable" in where
