// C++ tests of what both front ends must decide alike: roles from a LibTorch module tree
// (memopt::module_roles, as Python reads an nn.Module), FRUGAL's roles and proj_* flags, and the
// nonfinite "skip" policy of every LibTorch optimizer, decided on the host and on the device.
#include <torch/torch.h>

#include <memopt/memopt.h>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"

namespace {
using namespace memopt_test;

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

// Three named parameters (a projected MLP and attention weight, a norm) on `device`, the same
// values at every call.
Named named_params(const torch::Device& device = torch::kCPU) {
  torch::manual_seed(0);
  const auto param = [&](at::IntArrayRef shape) {
    return torch::randn(shape).to(device).requires_grad_();
  };
  return Named{{"model.layers.0.mlp.up_proj.weight", param({16, 8})},
               {"model.layers.0.self_attn.o_proj.weight", param({8, 8})},
               {"model.norm.weight", param({8})}};
}
std::vector<torch::Tensor> tensors(const Named& n) {
  std::vector<torch::Tensor> out;
  for (const auto& [name, p] : n) out.push_back(p);
  return out;
}

// check(name, host_steps, make) for every LibTorch class (make(named, nonfinite) constructs it,
// with update_proj_gap / update_gap 3): host_steps is how many of check_device_skip's steps the
// host decides.
template <typename Check>
void for_each_optimizer(const Check& check) {
  check("AdamW", 0, [](const Named& n, const std::string& mode) {
    return std::make_unique<memopt::AdamW>(tensors(n), memopt::AdamWOptions(1e-2).nonfinite(mode));
  });
  check("AdamMini", 0, [](const Named& n, const std::string& mode) {
    return std::make_unique<memopt::AdamMini>(n, memopt::AdamMiniOptions(1e-2).nonfinite(mode));
  });
  check("SlimAdam", 0, [](const Named& n, const std::string& mode) {
    return std::make_unique<memopt::SlimAdam>(n, memopt::AdamMiniOptions(1e-2).nonfinite(mode));
  });
  for (bool stored : {true, false})
    check(stored ? "Apollo" : "Apollo store_projection=false", 4,
          [stored](const Named& n, const std::string& mode) {
      return std::make_unique<memopt::Apollo>(n, memopt::ApolloOptions(1e-2).rank(2)
                                                     .update_proj_gap(3).store_projection(stored)
                                                     .nonfinite(mode));
    });
  check("ApolloMini", 4, [](const Named& n, const std::string& mode) {
    return std::make_unique<memopt::ApolloMini>(
        n, memopt::ApolloOptions::mini().lr(1e-2).update_proj_gap(3).nonfinite(mode));
  });
  for (const std::string selection : {"block", "columns", "random"})
    check("Frugal " + selection, 4, [selection](const Named& n, const std::string& mode) {
      memopt::FrugalConfig config;
      config.density = 0.5, config.update_gap = 3, config.seed = 3, config.selection = selection;
      return std::make_unique<memopt::Frugal>(n, memopt::FrugalOptions(1e-2).nonfinite(mode),
                                              config);
    });
}

// nonfinite "skip" decided on the host: a step with a NaN gradient changes nothing (the oracle:
// the same optimizer never asked to take it), is counted, and the count survives torch::save /
// torch::load.
void test_nonfinite() {
  for_each_optimizer([](const std::string& name, int64_t, const auto& make) {
    auto skipping = named_params(), oracle = named_params();
    auto a = make(skipping, "skip");
    auto b = make(oracle, "propagate");
    for (int s = 0; s < 5; ++s) {
      set_grads(tensors(skipping), s);
      if (s == 2) tensors(skipping)[1].mutable_grad()[0][0] = std::nan("");
      a->step();
      if (s != 2) set_grads(tensors(oracle), s), b->step();
    }
    check(a->skipped_steps() == 1 && b->skipped_steps() == 0 && a->host_decided_steps() == 5 &&
              same(tensors(skipping), tensors(oracle)),
          name + ": nonfinite skip == never taking the NaN step");
    std::stringstream buffer;
    torch::save(*a, buffer);
    auto c = make(named_params(), "skip");
    torch::load(*c, buffer);
    check(c->skipped_steps() == 1, name + ": skipped_steps round-trips through torch::save");
    check(throws<c10::ValueError>([&] { make(named_params(), "Skip"); }),
          name + ": an unknown nonfinite raises c10::ValueError");
  });
}

// nonfinite "skip" decided on the device (PlanOptimizer::step) against the same optimizer never
// asked to take the bad steps 1, 3 and 4 of 9: parameters and step counts bit for bit,
// skipped_steps, and the same again after a torch::save / torch::load and one more step. With
// update_proj_gap / update_gap 3, APOLLO and FRUGAL leave to the host exactly the steps where a
// count it does not know may hold a refresh or a new cycle: counts 0 (the first step), 1 (1
// skipped), 2, 2 (3 and 4 skipped), 2 (step 5: 2 or 3), 3, ...: steps 0, 3, 5 and 6, as the
// Python front end decides. On the CPU, which joins device_skip_types for the test, standing in
// for a GPU; on a GPU (--cuda), where the ops read the flag on the device.
void test_nonfinite_on_device(const torch::Device& device) {
  auto& types = memopt::device_skip_types();
  const auto saved_types = types;
  if (device.is_cpu()) types.push_back(c10::DeviceType::CPU);
  for_each_optimizer([&](const std::string& name, int64_t host_steps, const auto& make) {
    const auto steps = [](const auto& opt, const Named& n) {
      std::vector<double> out;
      for (const auto& p : tensors(n))
        if (const auto* s = opt->state_of(p)) out.push_back(s->at("step").template item<double>());
      return out;
    };
    auto skipping = named_params(device), oracle = named_params(device);
    auto a = make(skipping, "skip");
    auto b = make(oracle, "propagate");
    for (int s = 0; s < 9; ++s) {
      set_grads(tensors(skipping), s);
      if (s == 1 || s == 3 || s == 4) tensors(skipping)[s % 3].mutable_grad()[0] = INFINITY;
      a->step();
      if (s != 1 && s != 3 && s != 4) set_grads(tensors(oracle), s), b->step();
    }
    const std::string on = name + " (" + device.str() + ")";
    check(a->skipped_steps() == 3 && a->host_decided_steps() == host_steps &&
              same(tensors(skipping), tensors(oracle)) && steps(a, skipping) == steps(b, oracle),
          on + ": skips decided on the device (host decided " +
              std::to_string(a->host_decided_steps()) + ") == never taking the bad steps");
    std::stringstream buffer;
    torch::save(*a, buffer);
    auto resumed = named_params(device);
    for (size_t k = 0; k < resumed.size(); ++k) resumed[k].second.data().copy_(skipping[k].second);
    auto c = make(resumed, "skip");
    torch::load(*c, buffer);
    set_grads(tensors(resumed), 9), c->step();
    set_grads(tensors(oracle), 9), b->step();
    check(c->skipped_steps() == 3 && same(tensors(resumed), tensors(oracle)) &&
              steps(c, resumed) == steps(b, oracle),
          on + ": counts decided on the device are saved, and a resumed step is the oracle's");
  });
  types = saved_types;
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

// No argument: the CPU tests (ctest). "--cuda": the GPU's, for tests/test_cpp_package.py's cuda
// test (fails without a GPU).
int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--cuda") {
    check(torch::cuda::is_available(), "a CUDA device is available");
    if (torch::cuda::is_available()) test_nonfinite_on_device(torch::Device(torch::kCUDA));
    return finish();
  }
  test_nonfinite();
  test_nonfinite_on_device(torch::Device(torch::kCPU));
  test_module_roles();
  test_frugal_roles();
  return finish();
}
