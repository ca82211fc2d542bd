"""The registered torch ops themselves: schema/fake/dispatch checks (torch.library.opcheck),
block-spec validation, and the workspace's reuse across tensors and steps."""
import pytest
import torch

import memopt_core
from memopt_core import _C


def _adam_lists(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return params, grads, [torch.zeros_like(p) for p in params], [torch.zeros(()) for _ in params]


# found_inf (the ops' device-side skip, tests/test_found_inf.py): absent, clear, set
FOUND = [{}, {"found_inf": torch.zeros(1)}, {"found_inf": torch.ones(1)}]


@pytest.mark.parametrize("found", FOUND, ids=["", "found_inf=0", "found_inf=1"])
@pytest.mark.parametrize("rule", [None, "torch", "apollo"])
def test_opcheck_adamw(rule, found):
    params, grads, m, steps = _adam_lists([(8, 4), (5,)])
    v = [torch.zeros_like(p) for p in params]
    args = (params, grads, m, v, steps, torch.tensor(1e-3), 0.9, 0.999, 1e-8, 0.01)
    torch.library.opcheck(torch.ops.memopt.adamw_.default, args + ((rule,) if rule else ()),
                          kwargs=found)


@pytest.mark.parametrize("found", FOUND, ids=["", "found_inf=0", "found_inf=1"])
def test_opcheck_adam_mini(found):
    params, grads, m, steps = _adam_lists([(8, 4), (6,)])
    specs = [_C.adam_mini_blocks("query", [8, 4], head_dim=2)[0], _C.adam_mini_blocks("norm", [6])[0]]
    v = [torch.zeros(4), torch.zeros(1)]
    torch.library.opcheck(torch.ops.memopt.adam_mini_.default,
                          (params, grads, m, v, steps, _C.encode_block_specs(specs),
                           torch.tensor(1e-3), 0.9, 0.999, 1e-8, 0.0), kwargs=found)


@pytest.mark.parametrize("found", FOUND, ids=["", "found_inf=0", "found_inf=1"])
def test_opcheck_adam_mini_shard_ops(found):
    """Both FSDP2 ops on rows 2..5 of an (8, 4) tensor with per-head blocks of 2 rows."""
    params, grads, m, steps = _adam_lists([(4, 4)])
    blocks = _C.encode_block_specs([_C.adam_mini_blocks("query", [8, 4], head_dim=2)[0]])
    shards, sums = [8, 32], torch.zeros(4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.memopt.adam_mini_block_sums_.default,
                          (grads, blocks, shards, sums))
    torch.library.opcheck(torch.ops.memopt.adam_mini_shard_update_.default,
                          (params, grads, m, [torch.zeros(4)], steps, blocks, shards, sums,
                           torch.tensor(1e-3), 0.9, 0.999, 1e-8, 0.0), kwargs=found)


@pytest.mark.parametrize("segments, message", [
    ([(0, 4, 4, 4, 3, 4)], "not divisible"),          # 4 rows in tiles of 3
    ([(0, 2, 4, 4, 1, 4), (12, 2, 4, 4, 1, 4)], "reaches element"),  # past the end
    ([(0, 3, 4, 4, 1, 4), (8, 2, 4, 4, 1, 4)], "covers 20 of 16"),  # overlapping rows
    ([(0, 2, 4, 4, 1, 4)], "covers 8 of 16"),         # leaves half uncovered
    ([(0, 4, 4, 3, 1, 4)], "row_stride"),
])
def test_bad_block_specs_are_rejected(segments, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        _C.check_block_spec(segments, 16)


def test_bad_spec_leaves_tensors_untouched():
    params, grads, m, steps = _adam_lists([(4, 4)])
    before = [t.clone() for t in params + m + steps]
    bad = _C.encode_block_specs([[(0, 4, 4, 4, 3, 4)]])
    with pytest.raises((ValueError, RuntimeError)):
        torch.ops.memopt.adam_mini_(params, grads, m, [torch.zeros(1)], steps, bad,
                                    torch.tensor(1e-3), 0.9, 0.999, 1e-8, 0.0)
    for a, b in zip(params + m + steps, before):
        assert torch.equal(a, b)


def test_workspace_is_sized_once_and_reused():
    # A transposed (HF Conv1D, stored (in, out)) weight has one block per column: the narrow-tile
    # kernel path, which carves a row of column sums out of the workspace.
    from transformers.pytorch_utils import Conv1D

    model = torch.nn.Sequential()
    model.c_fc = Conv1D(256, 64)
    opt = memopt_core.AdamMini(model, lr=1e-3)
    _C.workspace_release("cpu")  # earlier tests' requests (e.g. APOLLO tiles) do not count
    w = model.c_fc.weight
    assert opt.blocks[w].count == 256 and opt.blocks[w].segments[0][4:] == (64, 1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    capacity, largest, grows = _C.workspace_stats("cpu")
    assert 0 < largest <= capacity
    for _ in range(3):
        opt.step()
    assert _C.workspace_stats("cpu")[2] == grows  # no growth after the first step
    assert largest < w.numel() * w.element_size()  # scratch is block-sized, not tensor-sized


def test_every_memopt_op_has_cpu_and_meta_kernels_and_a_mutable_schema():
    """Read from the dispatcher, so an op added later is covered without editing a list: each
    has a CPU kernel, a Meta kernel (torch.compile traces it) and declares what it writes."""
    from cuda_util import memopt_schemas
    schemas = memopt_schemas()
    assert len(schemas) >= 10
    for s in schemas:
        for key in ("CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(s.name, key), (s.name, key)
        assert any(a.alias_info is not None and a.alias_info.is_write for a in s.arguments), \
            f"{s.name} writes nothing according to its schema"


def test_every_memopt_op_has_a_validator_with_its_arguments_on_every_device():
    """Each op's validator (torch.ops.memopt.check_<op>, what the front ends call before any op
    of a step runs) is registered from the op's own schema: the same arguments, none written,
    one kernel for every device."""
    from cuda_util import memopt_schemas
    ops, validators = memopt_schemas(), {s.name: s for s in memopt_schemas(validators=True)}
    assert len(validators) == len(ops)
    for s in ops:
        v = validators["memopt::check_" + s.name.split("::")[1]]
        assert [(a.name, str(a.type)) for a in v.arguments] == \
            [(a.name, str(a.type)) for a in s.arguments]
        assert all(a.alias_info is None for a in v.arguments), v.name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(v.name, "CompositeExplicitAutograd")


def test_a_validator_raises_what_its_op_would_and_writes_nothing():
    p, g = torch.zeros(3), torch.ones(4)
    args = ([p], [g], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())],
            torch.tensor(1e-3, dtype=torch.float64), 0.9, 0.999, 1e-8, 0.0)
    for call in (torch.ops.memopt.check_adamw_, torch.ops.memopt.adamw_):
        with pytest.raises(ValueError, match="shape"):
            call(*args)
    assert p.eq(0).all()
    bad_lr = args[:5] + (torch.tensor(-1.0, dtype=torch.float64),) + args[6:]
    with pytest.raises(ValueError, match="learning rate"):
        torch.ops.memopt.check_adamw_([p], [torch.ones(3)], *bad_lr[2:])
