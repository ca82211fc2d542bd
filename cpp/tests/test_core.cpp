// C++ tests for what Python cannot reach: option validation in the LibTorch classes (AdamW,
// AdamMini, SlimAdam, Apollo), torch::save/torch::load round trips, per-group options
// (add_param_group included), and the ops being reachable through the dispatcher from a plain
// C++ program.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <functional>
#include <iostream>
#include <memopt/memopt.h>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"

namespace {
using namespace memopt_test;

std::vector<torch::Tensor> params(int64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({6, 4}).requires_grad_(), torch::randn({4}).requires_grad_()};
}

void test_option_validation() {
  auto ps = params(0);
  check(throws<c10::ValueError>([&] { memopt::AdamW(ps, memopt::AdamWOptions(-1.0)); }),
        "negative lr raises c10::ValueError at construction");
  check(throws<c10::ValueError>(
            [&] { memopt::AdamW(ps, memopt::AdamWOptions(1e-3).betas({0.9, 1.5})); }),
        "beta2 >= 1 raises");
  // Options edited after construction are checked by step(), before anything is written.
  memopt::AdamW opt(ps, memopt::AdamWOptions(1e-3));
  static_cast<memopt::AdamWOptions&>(opt.param_groups()[0].options()).eps(-1.0);
  const auto before = ps[0].detach().clone();
  set_grads(ps, 0);
  check(throws<c10::ValueError>([&] { opt.step(); }), "negative eps raises at step()");
  check(torch::equal(ps[0], before), "a rejected step leaves parameters untouched");
}

void test_save_load_round_trip() {
  auto straight = params(0);
  memopt::AdamW a(straight, memopt::AdamWOptions(1e-2).weight_decay(0.1));
  for (int s = 0; s < 5; ++s) set_grads(straight, s), a.step();

  auto resumed = params(0);
  std::stringstream buffer;
  {
    memopt::AdamW first(resumed, memopt::AdamWOptions(1e-2).weight_decay(0.1));
    for (int s = 0; s < 3; ++s) set_grads(resumed, s), first.step();
    torch::save(first, buffer);
  }
  memopt::AdamW second(resumed, memopt::AdamWOptions(1e-2).weight_decay(0.1));
  torch::load(second, buffer);
  for (int s = 3; s < 5; ++s) set_grads(resumed, s), second.step();
  check(same(straight, resumed), "save after 3 steps, load, 2 more == 5 straight steps");

  std::stringstream wrong;
  torch::save(second, wrong);
  auto other = std::vector<torch::Tensor>{torch::randn({3, 3}).requires_grad_(),
                                          torch::randn({4}).requires_grad_()};
  memopt::AdamW mismatched(other, memopt::AdamWOptions(1e-2));
  check(throws<c10::Error>([&] { torch::load(mismatched, wrong); }),
        "loading state of other shapes raises");
}

void test_group_options_are_kept() {
  auto ps = params(0);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{ps[0]},
                      std::make_unique<memopt::AdamWOptions>(memopt::AdamWOptions(0.5)));
  memopt::AdamW opt(groups, memopt::AdamWOptions(1e-3));
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {ps[1]}, std::make_unique<memopt::AdamWOptions>(memopt::AdamWOptions(0.25).eps(1e-6))));
  auto& g0 = static_cast<memopt::AdamWOptions&>(opt.param_groups()[0].options());
  auto& g1 = static_cast<memopt::AdamWOptions&>(opt.param_groups()[1].options());
  check(g0.lr() == 0.5, "constructor group keeps its lr");
  check(g1.lr() == 0.25 && g1.eps() == 1e-6, "add_param_group keeps the group's own options");

  // The group's lr is what the update uses: one step of Adam moves each entry by about lr.
  const auto before = ps[1].detach().clone();
  set_grads(ps, 0);
  opt.step();
  const double moved = (ps[1] - before).abs().max().item<double>();
  check(moved > 0.2 && moved < 0.3, "the added group steps with its own lr");
}

void test_scheduler_and_dispatcher() {
  auto ps = params(0);
  memopt::AdamW opt(ps, memopt::AdamWOptions(1.0));
  torch::optim::StepLR sched(opt, 1, 0.5);
  for (int s = 0; s < 3; ++s) {  // LibTorch's StepLR first decays on its second step()
    set_grads(ps, s);
    opt.step();
    sched.step();
  }
  check(opt.param_groups()[0].options().get_lr() == 0.25, "StepLR drives the lr");
  const auto op = c10::Dispatcher::singleton().findSchema({"memopt::adam_mini_", ""});
  check(op.has_value(), "memopt::adam_mini_ is registered with the dispatcher");
}

void test_adam_mini_blocks() {
  torch::manual_seed(0);
  std::vector<std::pair<std::string, torch::Tensor>> named = {
      {"model.layers.0.self_attn.q_proj.weight", torch::randn({64, 64}).requires_grad_()},
      {"model.layers.0.mlp.up_proj.weight", torch::randn({128, 64}).requires_grad_()},
      {"model.norm.weight", torch::ones({64}).requires_grad_()}};
  memopt::AdamMini opt(named, memopt::AdamMiniOptions(1e-3).dim(64).n_heads(4));
  check(memopt::num_blocks(opt.block_spec(named[0].second)) == 4, "q_proj: one block per head");
  check(memopt::num_blocks(opt.block_spec(named[1].second)) == 128, "up_proj: one per neuron");
  check(memopt::num_blocks(opt.block_spec(named[2].second)) == 1, "norm: one block");
  for (auto& [n, p] : named) p.mutable_grad() = torch::randn_like(p);
  opt.step();
  check(opt.param_groups().size() == 2, "norm goes to its own no-decay group");
  auto extra = torch::randn({8, 64}).requires_grad_();
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {extra}, std::make_unique<memopt::AdamMiniOptions>(memopt::AdamMiniOptions(0.1))));
  check(memopt::num_blocks(opt.block_spec(extra)) == 8, "added 2-D param: one block per row");
  extra.mutable_grad() = torch::randn_like(extra);
  opt.step();
  check(static_cast<memopt::AdamMiniOptions&>(opt.param_groups()[2].options()).lr() == 0.1,
        "AdamMini's added group keeps its lr");
}
void test_slim_adam_table() {
  torch::manual_seed(0);
  std::vector<std::pair<std::string, torch::Tensor>> named = {
      {"model.layers.0.self_attn.q_proj.weight", torch::randn({64, 32}).requires_grad_()},
      {"model.layers.0.mlp.down_proj.weight", torch::randn({32, 128}).requires_grad_()},
      {"model.norm.weight", torch::ones({32}).requires_grad_()}};
  memopt::SlimAdam opt(named, memopt::AdamMiniOptions(1e-3).dim(32).n_heads(4));
  check(memopt::num_blocks(opt.block_spec(named[0].second)) == 64, "SlimAdam q: one v per row");
  check(memopt::num_blocks(opt.block_spec(named[1].second)) == 128,
        "SlimAdam mlp: one v per input column");
  check(memopt::num_blocks(opt.block_spec(named[2].second)) == 32, "SlimAdam norm: uncompressed");
  // Against plain Adam math on the uncompressed norm: its update is AdamW's exactly.
  auto norm_ref = named[2].second.detach().clone().requires_grad_();
  memopt::AdamW adamw({norm_ref}, memopt::AdamWOptions(1e-3).weight_decay(0.0));
  for (int s = 0; s < 3; ++s) {
    torch::manual_seed(50 + s);
    for (auto& [n, p] : named) p.mutable_grad() = torch::randn_like(p);
    norm_ref.mutable_grad() = named[2].second.grad().clone();
    opt.step();
    adamw.step();
  }
  check(torch::allclose(named[2].second, norm_ref, 1e-6, 1e-7), "SlimAdam norm == AdamW");
  std::stringstream buffer;
  torch::save(opt, buffer);
  memopt::SlimAdam again(named, memopt::AdamMiniOptions(1e-3).dim(32).n_heads(4));
  torch::load(again, buffer);
  check(again.state().size() == 3, "SlimAdam state round-trips");
}

void test_apollo() {
  torch::manual_seed(0);
  auto make = [] {
    torch::manual_seed(0);
    return std::vector<std::pair<std::string, torch::Tensor>>{
        {"model.layers.0.mlp.up_proj.weight", torch::randn({16, 8}).requires_grad_()},
        {"model.norm.weight", torch::randn({8}).requires_grad_()}};
  };
  auto tensors = [](const std::vector<std::pair<std::string, torch::Tensor>>& named) {
    std::vector<torch::Tensor> out;
    for (const auto& [n, p] : named) out.push_back(p);
    return out;
  };
  check(throws<c10::ValueError>([&] {
          memopt::Apollo(make(), memopt::ApolloOptions(1e-2).rank(2).scale_type("row"));
        }),
        "an unknown scale_type raises c10::ValueError");
  check(throws<c10::ValueError>([&] {
          memopt::Apollo(make(), memopt::ApolloOptions(1e-2).proj("svd").store_projection(false));
        }),
        "svd without a stored projection raises");
  check(throws<c10::ValueError>([&] {
          memopt::Apollo(make(), memopt::ApolloOptions(1e-2).rank(2).adamw_rule("adam"));
        }),
        "an unknown adamw_rule raises c10::ValueError");
  const auto options =
      memopt::ApolloOptions::mini(1e-2).update_proj_gap(2).weight_decay(0.1).adamw_rule("torch");
  auto straight = make();
  memopt::ApolloMini a(straight, options);
  check(a.param_groups().size() == 2 &&
            static_cast<memopt::ApolloOptions&>(a.param_groups()[1].options()).rank() == 0,
        "the norm goes to a rank-0 (AdamW) group");
  for (int s = 0; s < 5; ++s) set_grads(tensors(straight), s), a.step();
  auto resumed = make();
  std::stringstream buffer;
  {
    memopt::ApolloMini first(resumed, options);
    for (int s = 0; s < 3; ++s) set_grads(tensors(resumed), s), first.step();
    torch::save(first, buffer);
  }
  memopt::ApolloMini second(resumed, options);
  torch::load(second, buffer);
  const auto& loaded = static_cast<memopt::ApolloOptions&>(second.param_groups()[0].options());
  check(loaded.scale() == 128.0 && loaded.scale_type() == "tensor" && loaded.rank() == 1 &&
            loaded.adamw_rule() == "torch",
        "ApolloOptions round-trip through torch::save / torch::load");
  for (int s = 3; s < 5; ++s) set_grads(tensors(resumed), s), second.step();
  check(same(tensors(straight), tensors(resumed)),
        "ApolloMini: save after 3 steps (mid refresh cycle), load, 2 more == 5 straight steps");
}
}  // namespace

int main() {
  test_option_validation();
  test_save_load_round_trip();
  test_group_options_are_kept();
  test_scheduler_and_dispatcher();
  test_adam_mini_blocks();
  test_slim_adam_table();
  test_apollo();
  return finish();
}
