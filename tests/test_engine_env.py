"""resure_ds/runtime/engine.py's environment fix for DeepSpeed's JIT op builds, checked against DeepSpeed's
own parser (the fused Adam's builder), which needs no GPU to read TORCH_CUDA_ARCH_LIST."""
import os

import pytest

from resure_ds.runtime.engine import jit_arch_list


def _gencode(monkeypatch, value):
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA one (not the CPU accelerator's)

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    builder = FusedAdamBuilder()
    builder.jit_mode = True
    builder.compute_capability_args()  # in JIT mode it writes the list torch's build will use
    return os.environ["TORCH_CUDA_ARCH_LIST"]


def test_arch_suffixes_are_read_as_deepspeed_can(monkeypatch):
    # The value a GPU image set (seen on an H100 image): DeepSpeed stops on it.
    with pytest.raises(ValueError, match="0a"):
        _gencode(monkeypatch, "9.0a")
    assert jit_arch_list("9.0a") == "9.0"
    assert jit_arch_list("8.0 9.0a;10.0f+PTX") == "8.0;9.0;10.0+PTX"
    assert _gencode(monkeypatch, jit_arch_list("9.0a 8.0")) == "8.0;9.0+PTX"


def test_readable_values_are_left_alone():
    for value in (None, "", "9.0", "8.0;9.0+PTX"):
        assert jit_arch_list(value) is None
