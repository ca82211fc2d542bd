"""memopt optimizers inside torchtitan 0.3.0 (memopt_core.integrations.torchtitan), on its real
llama3 debug model on CPU (torchtitan_util.py): the container built through torchtitan's config
steps like make_optimizer under torchtitan's LR schedule and resumes exactly from a DCP
checkpoint, its state_dict is torchtitan's flat FQN dict, the config and CLI plumbing, and
`import memopt_core` leaves torchtitan unimported. The model's roles and the CPU attention swap:
test_torchtitan_model.py; FSDP2 on 2 ranks: test_torchtitan_fsdp.py.

Skipped unless torchtitan 0.3.0 and triton are installed (pip install torchtitan==0.3.0 triton).
"""
import copy

import pytest
import torch

# first: skips this module without torchtitan and triton
from torchtitan_util import HP, OPTIONS, backward, debug_model

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import torchtitan.models.llama3.config_registry as llama3_configs
from torchtitan.components.optimizer import LRSchedulersContainer

import memopt_core
from memopt_core.integrations.torchtitan import MemoptOptimizersContainer, memopt_config

# Frugal's moments exist only for its active blocks. torchtitan's checkpointer loads with one
# dcp.load into the state layout of a fresh optimizer (its initial selection), so a checkpoint
# taken after a re-selection asks for moments the checkpoint does not have and DCP refuses it.
# (Frugal's own two-pass opt.load_checkpoint adopts the saved selection first.)
FRUGAL_RESELECTED = pytest.param(
    "frugal", dict(update_gap=2, seed=0), id="frugal-reselected-before-save",
    marks=pytest.mark.xfail(strict=True, raises=CheckpointException, reason=(
        "torchtitan 0.3.0 loads optimizer state in one dcp.load into a fresh optimizer's layout; "
        "Frugal's layout follows its selection")))


@pytest.fixture(scope="module")
def base_model():
    return debug_model()


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
