"""Adam-mini on row shards (what FSDP2 gives each rank), at the op level and in one process:
every shard's adam_mini_block_sums_ into one buffer (the sum an all-reduce makes), then
adam_mini_shard_update_ on each shard with its own copy of the (replicated) v, must equal
adam_mini_ on the full tensor: parameters, m, and every shard's v, over several steps.
Shards follow torch.chunk (FSDP2's Shard(0)): uneven, and empty on the last ranks."""
import pytest
import torch

import memopt_core
from memopt_core import _C
from conftest import make_grads, make_llama
from cuda_util import EMU, TOL, ops, requires_cuda, tensor_device

HP = (0.9, 0.95, 1e-8, 0.1)  # beta1, beta2, eps, weight_decay


def row_shards(rows: int, world: int) -> list:
    """[(row0, n_rows)] per rank, as torch.chunk / FSDP2 split dim 0."""
    size = -(-rows // world) if rows else 0
    return [(min(r * size, rows), max(0, min(size, rows - r * size))) for r in range(world)]


def run_full(params, specs, steps, dtype):
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros(sum((s[1] // s[4]) * (s[2] // s[5]) for s in spec), dtype=dtype) for spec in specs]
    st = [torch.zeros((), dtype=torch.float32) for _ in ps]
    enc = _C.encode_block_specs(specs)
    for step in range(steps):
        grads = make_grads(ps, step)
        torch.ops.memopt.adam_mini_(ps, grads, ms, vs, st, enc, torch.tensor(1e-2, dtype=torch.float64), *HP)
    return ps, ms, vs


def run_sharded(params, specs, steps, dtype, world, device="cpu", skipped=None, bits8=False):
    """[rank] -> (local params, local m, full v) after `steps` steps (or the steps of that list)
    on row shards, with the ops of `device` (cpu, the host-emulated CUDA glue "emu", or cuda).
    bits8: m as 8-bit codes, their block scales in "ms". skipped: None, or steps
    taken with a NaN gradient on one rank and found_inf set (every other step with found_inf
    clear; the step counters then live on the device)."""
    memopt = ops(device)
    params = [p.to(tensor_device(device)) for p in params]
    enc = _C.encode_block_specs(specs)
    nblocks = [sum((s[1] // s[4]) * (s[2] // s[5]) for s in spec) for spec in specs]
    ranks = []
    for r in range(world):
        cut = [row_shards(p.shape[0], world)[r] for p in params]
        local = [p.narrow(0, a, n).clone() for p, (a, n) in zip(params, cut)]
        shards = [v for p, (a, _) in zip(params, cut) for v in (a * (p.numel() // max(p.shape[0], 1)), p.numel())]
        ranks.append(dict(cut=cut, p=local,
                          m=[torch.zeros_like(t, dtype=torch.int8 if bits8 else t.dtype)
                             for t in local],
                          ms=[torch.zeros(-(-t.numel() // 256), device=t.device) for t in local],
                          v=[torch.zeros(n, dtype=dtype, device=local[0].device) for n in nblocks],
                          st=[torch.zeros((), dtype=torch.float32,
                                          device=local[0].device if skipped is not None else "cpu")
                              for _ in local], shards=shards))
    for step in range(steps) if isinstance(steps, int) else steps:
        grads = make_grads(params, step)  # the full gradients; each rank takes its rows
        found = {}
        if skipped is not None:
            found = {"found_inf": torch.full((1,), float(step in skipped), device=params[0].device)}
            if step in skipped:
                grads[step % len(grads)].view(-1)[-1] = float("nan")
        grads = [g.to(params[0].device) for g in grads]
        sums = torch.zeros(sum(nblocks), dtype=torch.float64, device=params[0].device)
        local_grads = []
        for rk in ranks:
            g = [gr.narrow(0, a, n) for gr, (a, n) in zip(grads, rk["cut"])]
            local_grads.append(g)
            part = torch.zeros_like(sums)
            memopt.adam_mini_block_sums_(g, enc, rk["shards"], part)
            sums += part
        for rk, g in zip(ranks, local_grads):
            kw = {**found, **({"state_scales": rk["ms"]} if bits8 else {})}
            torch.ops.memopt.check_adam_mini_shard_update_(rk["p"], g, rk["m"], rk["v"], rk["st"], enc, rk["shards"],
                                             sums, torch.tensor(1e-2, dtype=torch.float64), *HP,
                                             **kw)
            memopt.adam_mini_shard_update_(rk["p"], g, rk["m"], rk["v"], rk["st"], enc,
                                                     rk["shards"], sums,
                                                     torch.tensor(1e-2, dtype=torch.float64), *HP,
                                                     **kw)
    return ranks


def llama_specs(partition):
    model = make_llama(dtype=torch.float64)
    opt = (memopt_core.SlimAdam(model) if partition == "slim" else
           memopt_core.AdamMini(model, partition=partition))
    params = [p for g in opt.param_groups for p in g["params"]]
    return [p.detach() for p in params], [list(opt.blocks[p].segments) for p in params]


def hand_specs():
    """Blocks the LLaMA does not have: per-column tiles of a transposed weight (cut rows cut
    tiles), multi-row tiles larger than a shard, one block over a 1-D tensor, elementwise."""
    torch.manual_seed(0)
    shapes_specs = [
        ((10, 6), [(0, 10, 6, 6, 10, 2)]),            # 3 column blocks spanning all rows
        ((9, 4), [(0, 3, 12, 12, 1, 12)]),            # rows of 12 elements cut across tensor rows
        ((7,), [(0, 1, 7, 7, 1, 7)]),                 # one block over a 1-D norm
        ((5, 3), [(0, 1, 15, 15, 1, 1)]),             # elementwise
        ((12, 5), [(0, 12, 5, 5, 4, 5)]),             # per-head blocks of 4 rows
        ((8, 6), [(0, 8, 3, 6, 2, 3), (3, 8, 3, 6, 8, 1)]),  # two interleaved segments
    ]
    return ([torch.randn(s, dtype=torch.float64) for s, _ in shapes_specs],
            [spec for _, spec in shapes_specs])


@pytest.mark.parametrize("source", ["auto", "reference", "slim", "hand"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_equal_full_tensor(source, world):
    params, specs = hand_specs() if source == "hand" else llama_specs(source)
    fp, fm, fv = run_full(params, specs, 5, torch.float64)
    ranks = run_sharded(params, specs, 5, torch.float64, world)
    for i in range(len(params)):
        got_p = torch.cat([rk["p"][i] for rk in ranks])
        got_m = torch.cat([rk["m"][i] for rk in ranks])
        scale = fp[i].abs().max().item() or 1.0
        assert (got_p - fp[i]).abs().max().item() <= 1e-12 * scale, f"param {i}"
        assert (got_m - fm[i]).abs().max().item() <= 1e-12 * (fm[i].abs().max().item() or 1.0)
        for rk in ranks:  # v is replicated: every rank holds every block, equal to the full op's
            assert (rk["v"][i] - fv[i]).abs().max().item() <= 1e-12 * fv[i].abs().max().item()


@pytest.mark.parametrize("device", [EMU, pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", ["auto", "slim", "hand"])
def test_gpu_shards_equal_cpu_full_tensor(device, dtype, source):
    """The CUDA glue (on a GPU, or emulated on the host) against the CPU op on the full tensor,
    within the CPU-vs-CUDA tolerance of the storage dtype."""
    params, specs = hand_specs() if source == "hand" else llama_specs(source)
    params = [p.to(dtype) for p in params]
    fp, fm, fv = run_full(params, specs, 4, dtype)
    ranks = run_sharded(params, specs, 4, dtype, 3, device)
    for i in range(len(params)):
        for got, want in ((torch.cat([rk["p"][i] for rk in ranks]), fp[i]),
                          (torch.cat([rk["m"][i] for rk in ranks]), fm[i]), (ranks[1]["v"][i], fv[i])):
            err = (got.cpu().double() - want.double()).abs().max().item()
            assert err <= TOL[dtype] * (want.double().abs().max().item() or 1.0), f"tensor {i}"


@pytest.mark.parametrize("device", ["cpu", EMU, pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", ["auto", "hand"])
def test_a_found_inf_step_on_shards_is_a_step_never_taken(device, dtype, source):
    """adam_mini_shard_update_'s found_inf (the FSDP2 step decided on the device): steps 0 and
    3 of 5 carry a NaN on one rank's shard and the flag; every rank's parameters, m, v and step
    counts equal the run that never took them (bit for bit but on a GPU, whose pow may differ
    from the host's in the last bit)."""
    params, specs = hand_specs() if source == "hand" else llama_specs(source)
    params = [p.to(dtype) for p in params]
    got = run_sharded(params, specs, 5, dtype, 3, device, skipped=(0, 3))
    want = run_sharded(params, specs, [1, 2, 4], dtype, 3, device)
    for rk, ref in zip(got, want):
        assert all(float(t) == 3 for t in rk["st"])
        for key in ("p", "m", "v"):
            for i, (a, b) in enumerate(zip(rk[key], ref[key])):
                assert a.isfinite().all(), f"{key} {i}: the NaN step was not skipped"
                if device == "cuda":
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
                else:
                    assert torch.equal(a, b), f"{key} {i}"


def aligned_specs():
    """Tensors whose halves (2 row shards) hold whole 8-bit code blocks of 256 elements: per-head
    tiles; column blocks spanning all rows (a code block holds two of them); elementwise; two
    interleaved segments (a code block spans both, so two pieces each hold half of it)."""
    torch.manual_seed(0)
    shapes_specs = [((8, 256), [(0, 8, 256, 256, 2, 256)]),
                    ((4, 512), [(0, 4, 512, 512, 4, 128)]),
                    ((8, 128), [(0, 1, 1024, 1024, 1, 1)]),
                    ((8, 256), [(0, 8, 128, 256, 2, 128), (128, 8, 128, 256, 8, 1)])]
    return ([torch.randn(s, dtype=torch.float64) for s, _ in shapes_specs],
            [spec for _, spec in shapes_specs])


def assert_same_8bit_shards(got, want, dtype, exact):
    """Parameters, codes, scales and v of every rank: equal (exact), or within the CPU-vs-CUDA
    tolerance of the storage dtype, codes at most one apart in at most 1e-3 of them."""
    for rk, ref in zip(got, want):
        for i in range(len(ref["p"])):
            pairs = [(rk[k][i].cpu(), ref[k][i]) for k in ("p", "m", "ms", "v")]
            if exact:
                assert all(torch.equal(a, b) for a, b in pairs), f"tensor {i}"
                continue
            (p, p0), (m, m0), (s, s0), (v, v0) = pairs
            assert (p.double() - p0.double()).abs().max() <= TOL[dtype] * p0.double().abs().max()
            diff = (m.int() - m0.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3, f"codes {i}"
            torch.testing.assert_close(s, s0, rtol=1e-5, atol=0)
            torch.testing.assert_close(v, v0, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", [EMU, pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_8bit_m_on_gpu_shards_equals_the_cpu_op(device, dtype):
    """The CUDA shard op's 8-bit m (two passes over each piece, then the scales) against the
    CPU op's (spans decoded, stepped and encoded), 4 steps on 2 row shards, within the tolerance
    the float shard op meets (its v and factors are ATen arithmetic, a last bit apart)."""
    params, specs = aligned_specs()
    params = [p.to(dtype) for p in params]
    want = run_sharded(params, specs, 4, torch.float32, 2, "cpu", bits8=True)
    got = run_sharded(params, specs, 4, torch.float32, 2, device, bits8=True)
    assert any(rk["m"][0].any() for rk in got)
    assert_same_8bit_shards(got, want, dtype, exact=False)


@pytest.mark.parametrize("device", ["cpu", EMU, pytest.param("cuda", marks=requires_cuda)])
def test_a_found_inf_step_on_8bit_shards_is_a_step_never_taken(device):
    """Steps 0 and 3 of 5 with a NaN on one rank and found_inf: codes, scales, parameters, v
    and counts equal the run that never took them."""
    params, specs = aligned_specs()
    got = run_sharded(params, specs, 5, torch.float32, 2, device, skipped=(0, 3), bits8=True)
    want = run_sharded(params, specs, [1, 2, 4], torch.float32, 2, device, bits8=True)
    assert all(float(t) == 3 for rk in got for t in rk["st"])
    assert_same_8bit_shards([{k: [t.cpu() for t in rk[k]] for k in ("p", "m", "ms", "v")}
                             for rk in got],
                            [{k: [t.cpu() for t in rk[k]] for k in ("p", "m", "ms", "v")}
                             for rk in want], torch.float64, exact=device != "cuda")


def test_shard_ops_reject_bad_shards_untouched():
    params, specs = hand_specs()
    enc = _C.encode_block_specs(specs[:1])
    p = params[0][:5].clone()
    before = p.clone()
    sums = torch.zeros(3, dtype=torch.float64)
    args = ([p], [torch.ones_like(p)], [torch.zeros_like(p)], [torch.zeros(3, dtype=p.dtype)],
            [torch.zeros(())], enc)
    hp = (torch.tensor(1e-2, dtype=torch.float64), *HP)
    with pytest.raises(ValueError, match="cannot start at element"):
        torch.ops.memopt.adam_mini_shard_update_(*args, [40, 60], sums, *hp)  # past the end
    with pytest.raises(ValueError, match="float64"):
        torch.ops.memopt.adam_mini_shard_update_(*args, [0, 60], sums.float(), *hp)
    with pytest.raises(ValueError, match="one entry per block"):
        torch.ops.memopt.adam_mini_block_sums_([p], enc, [0, 60], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(p, before) and float(args[4][0]) == 0.0


def test_shard_update_refuses_8bit_m_whose_blocks_a_shard_cuts():
    """Codes are blocks of 256 elements of the full tensor: a shard starting inside one (rows
    of 100 elements) cannot step them; nothing is written."""
    p = torch.randn(3, 100)  # rows 3..5 of a (6, 100) tensor: elements [300, 600)
    before = p.clone()
    m, ms = torch.zeros(3, 100, dtype=torch.int8), torch.zeros(2)
    with pytest.raises(ValueError, match="cuts 8-bit state blocks"):
        torch.ops.memopt.adam_mini_shard_update_(
            [p], [torch.ones_like(p)], [m], [torch.zeros(6)], [torch.zeros(())],
            _C.encode_block_specs([[(0, 6, 100, 100, 1, 100)]]), [300, 600],
            torch.ones(6, dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64), *HP, [],
            [ms])
    assert torch.equal(p, before) and not m.any()
