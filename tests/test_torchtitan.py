"""memopt optimizers inside torchtitan 0.3.0 (memopt_core.integrations.torchtitan), on its real
llama3 debug model (Llama3Model: fused GQA wqkv, RMSNorm, RoPE, SwiGLU, lm_head) on CPU.

CPU limit: the debug model's flex attention runs forward on CPU (torch.compile'd, ~40 s) but its
backward raises "FlexAttention does not support backward on CPU", and torchtitan refuses sdpa as
a backend. Training steps here therefore swap each layer's inner attention for causal
scaled_dot_product_attention; test_sdpa_swap_matches_flex_forward (slow) checks the swap gives
flex's forward exactly. Everything else is torchtitan's own code.

Skipped unless torchtitan 0.3.0 and triton are installed (pip install torchtitan==0.3.0 triton).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton", reason="torchtitan's model code imports triton: pip install triton")
llama3 = pytest.importorskip("torchtitan.models.llama3",
                             reason="needs torchtitan: pip install torchtitan==0.3.0 triton")

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
import torchtitan.models.llama3.config_registry as llama3_configs  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer  # noqa: E402

import memopt_core  # noqa: E402
from memopt_core.integrations.torchtitan import (  # noqa: E402
    MemoptOptimizersContainer, memopt_config)
from memopt_core.roles import infer_roles  # noqa: E402

HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# Small projections refreshed every 2 steps, so a refresh falls on both sides of the checkpoint
# (steps 0-2 saved at 3, resumed for 3-4); Frugal's selection seed fixed so two instances
# choose alike, and its re-selection after the checkpoint (see FRUGAL_RESELECTED).
OPTIONS = {"apollo": dict(rank=16, update_proj_gap=2), "apollo_mini": dict(update_proj_gap=2),
           "frugal": dict(update_gap=4, seed=0)}
# Frugal's moments exist only for its active blocks. torchtitan's checkpointer loads with one
# dcp.load into the state layout of a fresh optimizer (its initial selection), so a checkpoint
# taken after a re-selection asks for moments the checkpoint does not have and DCP refuses it.
# (Frugal's own two-pass opt.load_checkpoint adopts the saved selection first.)
FRUGAL_RESELECTED = pytest.param(
    "frugal", dict(update_gap=2, seed=0), id="frugal-reselected-before-save",
    marks=pytest.mark.xfail(strict=True, raises=CheckpointException, reason=(
        "torchtitan 0.3.0 loads optimizer state in one dcp.load into a fresh optimizer's layout; "
        "Frugal's layout follows its selection")))
VOCAB, BATCH, SEQ = 2048, 2, 16


class CausalSDPA(nn.Module):
    """torchtitan's inner-attention interface ((B, L, N, H) in and out) over causal SDPA."""

    def forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True, scale=scale,
                                             enable_gqa=enable_gqa)
        return out.transpose(1, 2)


def debug_model(cpu_attention=True) -> nn.Module:
    torch.manual_seed(0)
    model = llama3.llama3_configs["debugmodel"]("flex").build()
    model.init_states()
    if cpu_attention:
        for layer in model.layers.values():
            layer.attention.inner_attention = CausalSDPA()
    return model


@pytest.fixture(scope="module")
def base_model():
    return debug_model()


def batch(step):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def backward(model, step):
    x, y = batch(step)
    F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).backward()


def copy_grads(src, dst):
    for p, q in zip(src.parameters(), dst.parameters()):
        q.grad = p.grad.clone()


def assert_same(model_a, opt_a, model_b, opt_b):
    """Parameters and every state entry bitwise equal (tensor by tensor, in parameter order)."""
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert sa.keys() == sb.keys(), name
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[key]), f"{name} {key}"
            else:
                assert value == sb[key], f"{name} {key}"


def test_roles_of_the_real_model(base_model):
    """tok_embeddings per token, lm_head output, norms whole, w1/w2/w3 MLP, wo attention output,
    and the fused wqkv cut per kv group: per head for q and k, per row for v."""
    roles = infer_roles(base_model.named_parameters(), base_model)
    a = base_model.layers["0"].attention
    hd, h, kv = a.head_dim, a.n_heads, a.n_kv_heads
    assert {n: r.role for n, r in roles.items() if not n.startswith("layers.")} == {
        "tok_embeddings.weight": "embedding", "norm.weight": "norm", "lm_head.weight": "output"}
    layer = {n.removeprefix("layers.0."): r for n, r in roles.items() if n.startswith("layers.0.")}
    assert {n: r.role for n, r in layer.items()} == {
        "attention.qkv_linear.wqkv.weight": "qkv", "attention.wo.weight": "attn_out",
        "feed_forward.w1.weight": "mlp", "feed_forward.w2.weight": "mlp",
        "feed_forward.w3.weight": "mlp", "attention_norm.weight": "norm", "ffn_norm.weight": "norm"}
    wqkv = layer["attention.qkv_linear.wqkv.weight"]
    assert (wqkv.kv_interleaved, wqkv.head_dim, wqkv.q_heads, wqkv.kv_heads) == (True, hd, h, kv)
    opt = memopt_core.AdamMini(base_model)
    assert opt.blocks[a.qkv_linear.wqkv.weight].count == h + kv + kv * hd


def test_slim_adam_table_on_the_interleaved_wqkv(base_model):
    """SlimAdam's table on torchtitan's wqkv, whose rows are per kv group [its q heads | k | v]:
    q and k averaged over fan-in (one value per row), v over fan-out (one value per column), and
    each block inside one kv group's rows (the stacked q|k|v reading would average v rows
    together with q rows of the next group)."""
    a = base_model.layers["0"].attention
    w = a.qkv_linear.wqkv.weight
    hd, h, kv, dim = a.head_dim, a.n_heads, a.n_kv_heads, w.shape[1]
    lay = memopt_core.SlimAdam(base_model).blocks[w]
    assert lay.count == kv * ((h // kv + 1) * hd + dim)
    group = (h // kv + 2) * hd * dim  # elements of one kv group's rows
    for off, rows, cols, stride, tr, tc in lay.segments:
        first, last = off, off + (rows - 1) * stride + cols - 1
        assert first // group == last // group, "a segment spans two kv groups"


def test_roles_of_a_gqa_model():
    """Llama 3 1B (GQA: 32 query heads, 8 kv heads of 64), on the meta device: per kv group 4
    query heads and a key head per head, 64 value rows per row."""
    with torch.device("meta"):
        model = llama3.llama3_configs["1B"]("flex").build()
    roles = infer_roles(model.named_parameters(), model)
    r = roles["layers.0.attention.qkv_linear.wqkv.weight"]
    assert (r.role, r.kv_interleaved, r.head_dim, r.q_heads, r.kv_heads) == ("qkv", True, 64, 32, 8)
    segments, note = r.blocks(model.layers["0"].attention.qkv_linear.wqkv.weight.shape)
    assert not note and sum((s[1] // s[4]) * (s[2] // s[5]) for s in segments) == 32 + 8 + 8 * 64
    assert roles["tok_embeddings.weight"].role == "embedding"  # tied to lm_head in 1B


@pytest.mark.parametrize("name,options", [pytest.param(n, OPTIONS.get(n, {}), id=n) for n in
                                          sorted(memopt_core.OPTIMIZERS)] + [FRUGAL_RESELECTED])
def test_container_steps_and_resumes_like_the_optimizer(name, options, base_model, tmp_path):
    """Built through torchtitan's config (with its LR schedule) the container steps exactly like
    make_optimizer on the same model; its state saved and loaded with DCP as torchtitan's
    checkpointer does resumes exactly."""
    model, direct_model = copy.deepcopy(base_model), copy.deepcopy(base_model)
    config = MemoptOptimizersContainer.Config(name=name, **HP, options=options)
    container = config.build(model_parts=[model])
    direct = memopt_core.make_optimizer(name, direct_model, **HP, **options)
    assert len(container) == 1 and type(container.optimizers[0]) is type(direct)
    sched = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8, min_lr_factor=0.1)
    schedulers = [sched.build(optimizers=opt, training_steps=10) for opt in (container, [direct])]
    for step in range(3):
        backward(model, step)
        copy_grads(model, direct_model)
        for opt, scheduler in zip((container, direct), schedulers):
            opt.step()
            opt.zero_grad()
            scheduler.step()
        assert_same(model, container.optimizers[0], direct_model, direct)

    dcp.save({"optimizer": container}, checkpoint_id=str(tmp_path))
    resumed_model = copy.deepcopy(model)
    resumed = config.build(model_parts=[resumed_model])
    dcp.load({"optimizer": resumed}, checkpoint_id=str(tmp_path))  # via state_dict/load_state_dict
    # torchtitan's state init for loading (a zero-gradient, zero-lr step) moved nothing
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
    lrs = [g["lr"] for opt in (container, resumed) for g in opt.optimizers[0].param_groups]
    assert len(set(lrs)) == 1  # the scheduled lr at the save came back with the state
    for step in range(3, 5):
        backward(model, step)
        copy_grads(model, resumed_model)
        for opt in (container, resumed):
            opt.step()
            opt.zero_grad()
        assert_same(model, container.optimizers[0], resumed_model, resumed.optimizers[0])


def test_state_dict_is_torchtitans_flat_fqn_dict(base_model):
    """Keys are torchtitan's `state.{fqn}.{key}` / `param_groups.{fqn}.{key}` with canonical FQNs,
    one optimizer per model part, and state exists before the first step (DCP needs it)."""
    parts = [copy.deepcopy(base_model), copy.deepcopy(base_model.layers["0"])]
    container = MemoptOptimizersContainer.Config(name="adam_mini").build(model_parts=parts)
    assert len(container) == 2
    before = [p.clone() for m in parts for p in m.parameters()]
    sd = container.state_dict()
    after = [p for m in parts for p in m.parameters()]
    assert all(torch.equal(a, p) for a, p in zip(before, after))
    assert {"state.tok_embeddings.weight.exp_avg", "state.layers.0.attention.wo.weight.exp_avg_sq",
            "state.attention.qkv_linear.wqkv.weight.exp_avg", "param_groups.norm.weight.lr",
            "param_groups.lm_head.weight.weight_decay"} <= sd.keys()
    assert sd["param_groups.norm.weight.weight_decay"] == 0.0  # Adam-mini: norms not decayed


def test_config_plumbing_and_errors(base_model):
    trainer_config = llama3_configs.llama3_debugmodel()
    memopt_config(trainer_config, "apollo_mini", betas=(0.9, 0.99), update_proj_gap=50)
    opt = trainer_config.optimizer
    assert isinstance(opt, MemoptOptimizersContainer.Config)
    assert (opt.name, opt.lr, opt.betas, opt.options) == ("apollo_mini", 8e-4, (0.9, 0.99),
                                                          {"update_proj_gap": 50})
    built = opt.build(model_parts=[copy.deepcopy(base_model)]).optimizers[0]
    assert isinstance(built, memopt_core.ApolloMini)
    assert built.param_groups[0]["update_proj_gap"] == 50
    with pytest.raises(ValueError, match="choose from"):
        MemoptOptimizersContainer.Config(name="AdamW").build(model_parts=[base_model])
    from torchtitan.components.optimizer import ParamGroupConfig
    groups = [ParamGroupConfig(pattern=".*", optimizer_name="AdamW")]
    with pytest.raises(ValueError, match="param_groups must be empty"):
        MemoptOptimizersContainer.Config(param_groups=groups).build(model_parts=[base_model])
    with pytest.raises(ValueError, match="fused_opt_states_bf16"):
        MemoptOptimizersContainer.Config(implementation="fused_opt_states_bf16").build(
            model_parts=[base_model])


def test_cli_selects_the_optimizer():
    """torchtitan's launcher parses --module/--config and --optimizer.* overrides into it."""
    from torchtitan.config import ConfigManager
    config = ConfigManager().parse_args([
        "--module", "memopt_core.integrations.torchtitan", "--config", "llama3_debugmodel_memopt",
        "--optimizer.name", "slim_adam", "--optimizer.lr", "3e-4", "--optimizer.betas", "0.9",
        "0.99", "--optimizer.weight-decay", "0.05"])
    opt = config.optimizer
    assert isinstance(opt, MemoptOptimizersContainer.Config)
    assert (opt.name, opt.lr, opt.betas, opt.weight_decay) == ("slim_adam", 3e-4, (0.9, 0.99), 0.05)


def test_memopt_core_does_not_import_torchtitan():
    """`import memopt_core` leaves torchtitan unimported; without torchtitan the integration
    raises an ImportError that says what to install."""
    import subprocess
    import sys
    code = ("import sys, memopt_core, memopt_core.integrations\n"
            "assert 'torchtitan' not in sys.modules, 'imported torchtitan'\n"
            "sys.modules['torchtitan'] = None  # as if not installed\n"
            "try:\n    import memopt_core.integrations.torchtitan\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install torchtitan==0.3.0 triton" in out.stdout

@pytest.mark.slow
def test_sdpa_swap_matches_flex_forward():
    flex, swapped = debug_model(cpu_attention=False), debug_model()
    x, _ = batch(0)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad():
        ref = flex(x, attention_masks=flex.get_attention_masks(positions=positions))
        torch.testing.assert_close(swapped(x), ref)


def _fsdp_worker(rank, world, root):
    """Each optimizer through the container on the debug model sharded by FSDP2 (fully_shard per
    block and root, as torchtitan's parallelize does): 2 steps, a DCP save of the container
    (sharded state), 2 more; then a fresh sharded run loads the checkpoint and repeats them."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from dist_util import full

    def sharded(name, values=None):
        model = debug_model()
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        for p, v in zip(model.parameters(), values or []):
            p.data.copy_(distribute_tensor(v, p.device_mesh, p.placements))
        config = MemoptOptimizersContainer.Config(name=name, **HP, options=OPTIONS.get(name, {}))
        return model, config.build(model_parts=[model])

    def train(model, container, steps):
        for step in steps:  # every rank the same batch: FSDP2's mean of equal gradients is exact
            backward(model, step)
            container.step()
            container.zero_grad()
        return [full(p).detach().clone() for p in model.parameters()]

    out = {}
    for name in NAMES:
        try:
            model, container = sharded(name)
            at_save = train(model, container, range(2))
            dcp.save({"optimizer": container}, checkpoint_id=f"{root}/{name}")
            straight = train(model, container, range(2, 4))
            model, container = sharded(name, at_save)
            dcp.load({"optimizer": container}, checkpoint_id=f"{root}/{name}")
            out[name] = dict(at_save=at_save, straight=straight,
                             resumed=train(model, container, range(2, 4)))
        except Exception:  # noqa: BLE001  (reported by this optimizer's test)
            import traceback
            out[name] = {"error": traceback.format_exc()}
    return out


NAMES = sorted(memopt_core.OPTIMIZERS)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    from dist_util import run_workers
    root = tmp_path_factory.mktemp("fsdp")
    return root, run_workers(_fsdp_worker, 2, str(root))


def _same(got, want, exact):
    for a, b in zip(got, want, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:  # statistics summed across shards: float32 rounding of the one-process sums
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_through_the_container_with_dcp_resharding(name, fsdp_runs):
    """2 gloo ranks: the sharded run equals the single-process one (AdamW bit for bit, the others
    to float32 rounding of their cross-shard statistics), resumes from its own sharded checkpoint
    bit for bit, and the same checkpoint loads into one process (DCP reshards the state the
    container saved) and continues like the uninterrupted run."""
    root, ranks = fsdp_runs
    for r in ranks:
        assert "error" not in r[name], r[name].get("error")
    exact = name == "adamw"
    model = debug_model()
    direct = memopt_core.make_optimizer(name, model, **HP, **OPTIONS.get(name, {}))
    for step in range(4):
        backward(model, step)
        direct.step()
        direct.zero_grad()
        if step == 1:
            at_save = [p.detach().clone() for p in model.parameters()]
    expected = [p.detach() for p in model.parameters()]
    for r in ranks:
        _same(r[name]["at_save"], at_save, exact)
        _same(r[name]["straight"], expected, exact)
        _same(r[name]["resumed"], r[name]["straight"], exact=True)
    single = debug_model()
    with torch.no_grad():
        for p, v in zip(single.parameters(), ranks[0][name]["at_save"]):
            p.copy_(v)
    config = MemoptOptimizersContainer.Config(name=name, **HP, options=OPTIONS.get(name, {}))
    container = config.build(model_parts=[single])
    dcp.load({"optimizer": container}, checkpoint_id=f"{root}/{name}")
    for step in range(2, 4):
        backward(single, step)
        container.step()
        container.zero_grad()
    _same(list(single.parameters()), ranks[0][name]["straight"], exact)
