"""Files written past the page cache (rgsd_pipeline/direct_io.py) against the libraries' own readers and writers."""

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rgsd_pipeline.direct_io import BUFFER_BYTES, DirectFile, write_safetensors


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(3000, 2459, generator=generator),  # 3.5 buffers: they alternate
            "bf16": torch.randn(7, 3, generator=generator).to(torch.bfloat16),
            "ids": torch.arange(11, dtype=torch.int64),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
            "strided": torch.randn(6, 5, generator=generator).t()}


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("folder", ["tmp", "/dev/shm"])  # a disk's file system takes O_DIRECT, tmpfs refuses it
def test_safetensors_written_here_are_the_bytes_the_library_writes_hashed_on_the_way(folder, direct, tmp_path):
    if folder == "/dev/shm" and not Path(folder).is_dir():
        pytest.skip("no /dev/shm here")
    path = (tmp_path if folder == "tmp" else Path(folder)) / f"direct-{tmp_path.name}.safetensors"
    try:
        digest = hashlib.sha256()
        write_safetensors(tensors(), path, {"format": "pt"}, direct=direct, digest=digest)
        save_file({name: t.contiguous() for name, t in tensors().items()}, tmp_path / "library.safetensors",
                  metadata={"format": "pt"})
        assert path.read_bytes() == (tmp_path / "library.safetensors").read_bytes()
        assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
        loaded = load_file(path)
        for name, tensor in tensors().items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    finally:
        path.unlink(missing_ok=True)


def test_torch_save_through_a_direct_file_loads_with_weights_only(tmp_path):
    moments = {"exp_avg": torch.randn(BUFFER_BYTES // 4 + 3)}  # past one buffer, not a whole block
    state = {"optimizer": {"state": {0: moments}, "param_groups": [{"lr": 1e-5}]}, "torch_rng": torch.get_rng_state()}
    with DirectFile(tmp_path / "optimizer.pt") as file:
        torch.save(state, file)
    assert (tmp_path / "optimizer.pt").stat().st_size == file.size  # the padded last block is cut off
    loaded = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
