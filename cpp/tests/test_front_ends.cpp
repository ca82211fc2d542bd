// C++ tests of what both front ends must decide alike: roles from a LibTorch module tree
// (memopt::module_roles, as Python reads an nn.Module), FRUGAL's roles and proj_* flags, and the
// nonfinite "skip" policy of every LibTorch optimizer.
#include <torch/torch.h>

#include <memopt/memopt.h>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"

namespace {
using namespace memopt_test;

// nonfinite "skip": a step with a NaN gradient changes nothing (the oracle: the same optimizer
// never asked to take it), is counted, and the count survives torch::save / torch::load.
template <typename Opt, typename Make>
void check_nonfinite_skip(const std::string& name, const Make& make) {
  using Named = std::vector<std::pair<std::string, torch::Tensor>>;
  const auto named = [] {
    torch::manual_seed(0);
    return Named{{"model.layers.0.mlp.up_proj.weight", torch::randn({16, 8}).requires_grad_()},
                 {"model.layers.0.self_attn.o_proj.weight", torch::randn({8, 8}).requires_grad_()},
                 {"model.norm.weight", torch::randn({8}).requires_grad_()}};
  };
  const auto tensors = [](const Named& n) {
    std::vector<torch::Tensor> out;
    for (const auto& [name, p] : n) out.push_back(p);
    return out;
  };
  auto skipping = named(), oracle = named();
  auto a = make(skipping, "skip");
  auto b = make(oracle, "propagate");
  for (int s = 0; s < 5; ++s) {
    set_grads(tensors(skipping), s);
    if (s == 2) tensors(skipping)[1].mutable_grad()[0][0] = std::nan("");
    a->step();
    if (s != 2) set_grads(tensors(oracle), s), b->step();
  }
  check(a->skipped_steps() == 1 && b->skipped_steps() == 0 &&
            same(tensors(skipping), tensors(oracle)),
        name + ": nonfinite skip == never taking the NaN step");
  std::stringstream buffer;
  torch::save(*a, buffer);
  auto c = make(named(), "skip");
  torch::load(*c, buffer);
  check(c->skipped_steps() == 1, name + ": skipped_steps round-trips through torch::save");
  check(throws<c10::ValueError>([&] { make(named(), "Skip"); }),
        name + ": an unknown nonfinite raises c10::ValueError");
}

void test_nonfinite() {
  using Named = std::vector<std::pair<std::string, torch::Tensor>>;
  check_nonfinite_skip<memopt::AdamW>("AdamW", [](const Named& n, const std::string& mode) {
    std::vector<torch::Tensor> ps;
    for (const auto& [name, p] : n) ps.push_back(p);
    return std::make_unique<memopt::AdamW>(ps, memopt::AdamWOptions(1e-2).nonfinite(mode));
  });
  check_nonfinite_skip<memopt::AdamMini>("AdamMini", [](const Named& n, const std::string& mode) {
    return std::make_unique<memopt::AdamMini>(n, memopt::AdamMiniOptions(1e-2).nonfinite(mode));
  });
  check_nonfinite_skip<memopt::Apollo>("Apollo", [](const Named& n, const std::string& mode) {
    return std::make_unique<memopt::Apollo>(
        n, memopt::ApolloOptions(1e-2).rank(2).update_proj_gap(2).nonfinite(mode));
  });
  check_nonfinite_skip<memopt::Frugal>("Frugal", [](const Named& n, const std::string& mode) {
    memopt::FrugalConfig config;
    config.density = 0.5, config.update_gap = 2, config.seed = 3;
    return std::make_unique<memopt::Frugal>(n, memopt::FrugalOptions(1e-2).nonfinite(mode),
                                            config);
  });
}
// A LLaMA-shaped LibTorch model (GQA: 4 query heads, 2 kv heads of 8), named as HF names it.
struct Attention : torch::nn::Module {
  Attention() {
    register_module("q_proj", torch::nn::Linear(torch::nn::LinearOptions(32, 32).bias(false)));
    register_module("k_proj", torch::nn::Linear(torch::nn::LinearOptions(32, 16).bias(false)));
    register_module("v_proj", torch::nn::Linear(torch::nn::LinearOptions(32, 16).bias(false)));
    register_module("o_proj", torch::nn::Linear(torch::nn::LinearOptions(32, 32).bias(false)));
  }
};
struct Layer : torch::nn::Module {
  Layer() {
    register_module("self_attn", std::make_shared<Attention>());
    register_module("input_layernorm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({32})));
    register_module("up_proj", torch::nn::Linear(32, 48));
  }
};
struct Tiny : torch::nn::Module {
  Tiny() {
    register_module("embed_tokens", torch::nn::Embedding(64, 32));
    auto layers = torch::nn::ModuleList();
    layers->push_back(std::make_shared<Layer>());
    register_module("layers", layers);
    register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(32, 64).bias(false)));
  }
};

// The roles the module tree gives, as tests/test_roles.py expects of the same nn.Module.
void test_module_roles() {
  Tiny model;
  const auto roles = memopt::module_roles(model, {32, 4, 2, 0});
  std::string got;
  for (const auto& [p, info] : roles)
    got += memopt::role_name(info.role) + "/" + std::to_string(info.head_dim) + " ";
  check(got == "embedding/0 query/8 key/8 value/0 attn_out/0 norm/0 bias/0 mlp/0 bias/0 output/0 ",
        "module_roles of a LLaMA-shaped LibTorch model: " + got);
  memopt::AdamMini opt(roles, memopt::AdamMiniOptions(1e-3));
  check(memopt::num_blocks(opt.block_spec(roles[2].first)) == 2,
        "GQA key of 2 kv heads from the module tree: 2 blocks");
}

// Explicit roles give the decisions that role_from_name gives for the same tensors, and the
// plan's proj_* flags make an embedding and a norm projectable, as in the Python front end.
void test_frugal_roles() {
  auto make = [] {
    torch::manual_seed(0);
    return std::vector<torch::Tensor>{torch::randn({16, 8}).requires_grad_(),
                                      torch::randn({8, 8}).requires_grad_(),
                                      torch::randn({8}).requires_grad_()};
  };
  auto a = make(), b = make();
  memopt::FrugalConfig config;
  config.density = 0.5, config.update_gap = 2, config.seed = 3;
  config.proj_embeds = config.proj_norms = true;
  const std::vector<std::pair<std::string, torch::Tensor>> named_params = {
      {"model.embed_tokens.weight", a[0]}, {"model.layers.0.mlp.up_proj.weight", a[1]},
      {"model.norm.weight", a[2]}};
  auto with_roles = [](const std::vector<torch::Tensor>& ps) {
    return std::vector<std::pair<torch::Tensor, memopt::Role>>{
        {ps[0], memopt::Role::Embedding}, {ps[1], memopt::Role::Mlp}, {ps[2], memopt::Role::Norm}};
  };
  memopt::Frugal named(named_params, memopt::FrugalOptions(1e-2), config);
  memopt::Frugal roles(with_roles(b), memopt::FrugalOptions(1e-2), config);
  check(named.plan().num_projectable() == 3 && roles.plan().num_projectable() == 3,
        "Frugal: proj_embeds and proj_norms make an embedding and a norm projectable");
  for (int s = 0; s < 5; ++s) set_grads(a, s), set_grads(b, s), named.step(), roles.step();
  check(same(a, b) && named.active_blocks() == roles.active_blocks(),
        "Frugal: explicit roles step as the same roles from names");
  config.proj_embeds = config.proj_norms = false;
  memopt::Frugal plain(with_roles(b), memopt::FrugalOptions(1e-2), config);
  check(plain.plan().projectable() == std::vector<int64_t>{1},
        "Frugal: without proj_* only the MLP weight is projectable");
}
}  // namespace

int main() {
  test_nonfinite();
  test_module_roles();
  test_frugal_roles();
  return finish();
}
