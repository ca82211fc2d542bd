"""memopt_core.AdamMini with partition="reference" against PyPI adam-mini 1.1.1 on tiny HF LLaMA
(GQA) and GPT-2 models: parameters, m and v after 8 steps, the same weight-decay decisions and
block counts. partition="auto" against the float64 paper reference: test_adam_mini.py."""
from __future__ import annotations

import memopt_core
from adam_mini_util import D, H, HKV, STEPS
from conftest import assert_close, make_gpt2, make_grads, make_llama, rounding_atol, set_grads


# ---- partition="reference" vs PyPI adam-mini 1.1.1 -------------------------------------------
def _compare_with_pypi(make_model, build_ours, dim, n_heads, n_kv_heads):
    from adam_mini import Adam_mini
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours_model, their_model = make_model(), make_model()
    ours = build_ours(ours_model, hp)
    theirs = Adam_mini(their_model.named_parameters(), **hp, dim=dim, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, verbose=False)
    ours_named = list(ours_model.named_parameters())
    their_named = list(their_model.named_parameters())
    start = [p.detach().clone() for _, p in ours_named]
    for step in range(STEPS):
        grads = make_grads([p for _, p in ours_named], step)
        set_grads([p for _, p in ours_named], grads)
        set_grads([p for _, p in their_named], grads)
        ours.step()
        theirs.step()

    their_groups = {g["name"]: g for g in theirs.param_groups}
    for (name, p), (_, q), p0 in zip(ours_named, their_named, start):
        s, t = ours.state[p], theirs.state[q]
        g = their_groups[name.lower()]
        assert s["step"].item() == t["step"] == STEPS
        # same weight-decay decision (adam-mini: by name)
        ours_wd = next(og["weight_decay"] for og in ours.param_groups if any(x is p for x in og["params"]))
        assert ours_wd == g["weight_decay"], name
        their_v = t["vmean"] if "vmean" in t else t["v"]
        assert s["exp_avg_sq"].numel() == their_v.numel(), f"{name}: block count"
        assert_close(p, q, 2e-6, f"{name} param", origin=p0,
                     atol=rounding_atol(p, STEPS, 3))  # adam-mini rounds p 2-3 times a step
        assert_close(s["exp_avg"], t["m"].reshape(p.shape), 2e-6, f"{name} m")
        assert_close(s["exp_avg_sq"], their_v.reshape(-1), 2e-6, f"{name} v")
    return ours


def test_reference_partition_matches_pypi_adam_mini_on_llama():
    ours = _compare_with_pypi(
        make_llama,
        lambda m, hp: memopt_core.AdamMini(m.named_parameters(), **hp, dim=D, n_heads=H,
                                           n_kv_heads=HKV, partition="reference"),
        dim=D, n_heads=H, n_kv_heads=HKV)
    counts = {b.name: b.count for b in ours.blocks.values()}
    assert counts["model.layers.0.self_attn.q_proj.weight"] == H
    assert counts["model.layers.0.self_attn.k_proj.weight"] == HKV   # GQA: dim*dim/H elements
    assert counts["model.layers.1.input_layernorm.weight"] == 1


def test_reference_partition_matches_pypi_adam_mini_on_gpt2():
    # dims come from the model's config here (GPT2Config n_embd / n_head)
    ours = _compare_with_pypi(
        make_gpt2, lambda m, hp: memopt_core.AdamMini(m, **hp, partition="reference"),
        dim=D, n_heads=H, n_kv_heads=None)
    counts = {b.name: b.count for b in ours.blocks.values()}
    assert counts["transformer.h.0.attn.c_attn.weight"] == 1   # adam-mini: unmatched -> 1 block
    assert counts["transformer.h.0.mlp.c_fc.weight"] == D      # per row of (in, out): per input
    assert counts["transformer.h.0.attn.c_attn.bias"] == 3 * D
