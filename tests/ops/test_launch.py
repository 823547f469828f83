"""Launch geometry and device guard shared by every Triton launcher (tcm_kernels/triton/_launch.py).

The grid arithmetic is checked on sizes past CUDA's limits without allocating anything: a launch
geometry is plain integers.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

pytest.importorskip("triton")

from tcm_kernels.triton import _launch  # noqa: E402
from tcm_kernels.triton.sparse_norm import _block as norm_block, elementwise_grid  # noqa: E402


def test_check_grid_accepts_the_limits_and_names_what_is_over():
    assert _launch.check_grid("op", (2**31 - 1, 65535, 65535)) == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"op: input too large for one launch: grid dimension 1 would need 65536 "
                                         r"programs, CUDA allows at most 65535"):
        _launch.check_grid("op", (1, 65536))
    with pytest.raises(ValueError, match="grid dimension 0 would need 2147483648"):
        _launch.check_grid("op", (2**31,))
    with pytest.raises(ValueError, match="1 to 3 dimensions"):
        _launch.check_grid("op", (1, 1, 1, 1))


@pytest.mark.parametrize("planes,length", [(1, 416**3), (2 * 64, 512**3), (64 * 1024, 1024), (1, 2**33)])
def test_sparse_norm_elementwise_grid_launches_past_the_old_2d_limit(planes, length):
    """The (planes, L tiles) grid failed for L > 65,535 * 1024 = 67,107,840 sites (a 416^3 volume)."""
    block = norm_block(length)
    grid = _launch.check_grid("sparse_norm", elementwise_grid(planes, length, block))
    tiles = -(-length // block)
    assert grid == (planes * tiles,)
    # every (plane, tile) pair is one program: the kernel's decoding (pid // tiles, pid % tiles) covers them
    last = grid[0] - 1
    assert (last // tiles, last % tiles) == (planes - 1, tiles - 1)


def test_grids_of_other_launchers_fit_at_large_sizes():
    import triton

    from tcm_kernels.triton.info_nce import choose_config
    from tcm_kernels.triton.submconv import launch_tiles

    # info_nce backward at B = 2^20 pairs, D = 4096: (row blocks, column blocks)
    cfg = choose_config(4096, torch.bfloat16, _launch.SHARED_MEMORY[90], True)
    _launch.check_grid("info_nce", (triton.cdiv(2**20, cfg.block_m), triton.cdiv(4096, cfg.block_o)))
    # submconv: 10^9 active rows, 4096 output channels, depthwise over 4096 groups
    bm, bn, _, _ = launch_tiles(1, 4096, torch.float16)
    _launch.check_grid("submanifold_conv", (triton.cdiv(10**9, bm), triton.cdiv(4096, bn), 1))
    _launch.check_grid("submanifold_conv", (triton.cdiv(10**9, bm), 1, 4096))


def test_every_triton_launch_goes_through_launch():
    """No ``kernel[grid](...)`` outside _launch.launch: each launch gets the device guard and grid check."""
    root = pathlib.Path(_launch.__file__).parent
    direct = [f"{path.name}:{n}" for path in sorted(root.glob("*.py")) if path.name != "_launch.py"
              for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\w\[[^\]]*\]\(", line)
              and "_kernel[" in line]
    assert not direct, direct


def test_launch_guards_the_tensors_device(monkeypatch):
    """The device passed to launch is made current around the launch (cuda:1 with device 0 current would
    otherwise launch on GPU 0); run here through the interpreter with a recording guard."""
    import contextlib

    seen = []

    @contextlib.contextmanager
    def record(device):
        seen.append(device)
        yield

    monkeypatch.setattr(_launch, "device_guard", record)
    x = torch.randn(2, 3, 40)
    mask = torch.rand(2, 40) > 0.5
    from tcm_kernels.triton.sparse_norm import masked_moments

    masked_moments(x, mask)
    assert seen == [x.device]


def test_device_guard_and_shared_memory_without_a_gpu():
    assert isinstance(_launch.device_guard(torch.device("cpu")), type(__import__("contextlib").nullcontext()))
    assert _launch.shared_memory_limit(torch.device("cpu")) == _launch.SHARED_MEMORY[80]


def test_empty_grid_launches_nothing():
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            calls.append(grid)
            return lambda *a, **k: None

    _launch.launch("op", Kernel(), (0, 4), torch.device("cpu"))
    _launch.launch("op", Kernel(), (2, 4), torch.device("cpu"))
    assert calls == [(2, 4)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    import tcm_kernels

    x = torch.randn(2, 4, 6, 6, device="cuda:1")
    mask = torch.rand(2, 1, 6, 6, device="cuda:1") > 0.3
    w = torch.randn(4, 4, 3, 3, device="cuda:1")
    with torch.cuda.device(0):
        y = tcm_kernels.submanifold_conv(x, mask, w, backend="triton")
        a = torch.randn(8, 16, device="cuda:1")
        loss = tcm_kernels.info_nce(a, a.roll(1, 0), temperature=0.1, backend="triton")
    ref = tcm_kernels.submanifold_conv(x.cpu(), mask.cpu(), w.cpu(), backend="reference")
    torch.testing.assert_close(y.cpu(), ref, atol=1e-4, rtol=1e-4)
    assert loss.device == a.device and torch.isfinite(loss)


def test_gpu_references_are_exact_fp32():
    """conftest.py turns TF32 off, so references computed on a GPU (F.conv through cuDNN) are exact fp32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    else:
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
