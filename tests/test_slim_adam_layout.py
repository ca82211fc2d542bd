"""SlimAdam's second-moment layouts in the Adam-mini kernel: every supported dim set's block
order is the reference's keepdim mean, the op's own checks (opcheck) on SlimAdam's layouts, and
the narrow-tile kernel path (column tiles) for any thread count against the float64 reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt_core
from conftest import assert_close, rounding_atol, slim_adam_blocks
from test_slim_adam import STEPS, _run


def test_opcheck_adam_mini_op_with_slimadam_layouts():
    """SlimAdam's layouts (column tiles, a strided q,k | v split) through the op's checks."""
    from memopt_core import _C
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 24), (12, 16), (3, 4, 5)]
    layouts = [slim_adam_blocks([8, 24], role=("qkv", True, 4, 2, 2, False)),
               slim_adam_blocks([12, 16], [0]), slim_adam_blocks([3, 4, 5], [0, 2])]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    v = [torch.zeros(torch.Size(lay[1]).numel()) for lay in layouts]
    torch.library.opcheck(torch.ops.memopt.adam_mini_.default,
                          (params, grads, [torch.zeros_like(p) for p in params], v,
                           [torch.zeros(()) for _ in params],
                           _C.encode_block_specs([lay[0] for lay in layouts]),
                           torch.tensor(1e-3), 0.9, 0.999, 1e-8, 0.0))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (3, 1, 4, 5), (2, 3, 2, 2, 3)])
def test_dims_layout_blocks_are_the_keepdim_mean_in_row_major_order(shape):
    """Every dim set the kernel supports: element -> block from the segments equals element ->
    its slice of the kept dims (row-major), i.e. v.view(v_shape) is torch.mean(keepdim=True)."""
    from memopt_core import _C
    from memopt_core.snr import dim_subsets
    n = torch.Size(shape).numel()
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1).reshape(n, -1)
    supported = 0
    for dims in dim_subsets(len(shape)):
        if not _C.slim_adam_dims_supported(list(shape), list(dims)):
            assert len(shape) >= 4          # every set of a 1-, 2- or 3-D tensor is supported
            continue
        supported += 1
        segs, v_shape, got_dims, _ = slim_adam_blocks(shape, dims)
        assert tuple(got_dims) == dims and list(v_shape) == [1 if d in dims else s for d, s in enumerate(shape)]
        block = torch.full((n,), -1)
        base = 0
        for off, rows, cols, stride, tr, tc in segs:
            for r in range(rows):
                for c in range(cols):
                    block[off + r * stride + c] = base + (r // tr) * (cols // tc) + c // tc
            base += (rows // tr) * (cols // tc)
        kept = coords.clone()
        kept[:, list(dims)] = 0
        expected = sum(kept[:, d] * torch.Size(v_shape[d + 1:]).numel() for d in range(len(shape)))
        assert torch.equal(block, expected), dims
    assert supported >= 2 ** min(len(shape), 3) - 1


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tall_column_tiles_match_reference_for_any_thread_count(threads):
    """>= 512 rows per tile: with several threads the kernel splits rows and sums per thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = nn.Module()
        model.mlp = nn.Module()
        model.mlp.up_proj = nn.Linear(24, 1600, bias=False)        # fan-out mean over 1600 rows
        opt = memopt_core.SlimAdam(model, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
        named, ref, _ = _run(model, lambda n, s: (0,), opt)
        (name, p), = named
        assert_close(p, ref.p[0], 1e-5, name, origin=ref.p0[0], atol=rounding_atol(p, STEPS))
        assert_close(opt.state[p]["exp_avg_sq"], ref.v[0], 1e-6, f"{name} v")
    finally:
        torch.set_num_threads(old)
