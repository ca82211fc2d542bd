// _C.CppAdamW / _C.CppAdamMini: the LibTorch optimizers (memopt/optimizers.h) as Python objects,
// to test and drive the C++ front end from Python. Thin: construction, step, save/load, state.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <torch/serialize.h>

#include "memopt/frugal_optimizer.h"
#include "memopt/optimizers.h"
#include "tensor_caster.h"

namespace nb = nanobind;
using namespace memopt;

namespace {
using Betas = std::pair<double, double>;
using StateTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // step, exp_avg, exp_avg_sq
using GroupTuple = std::tuple<std::vector<at::Tensor>, double, double>;  // params, lr, wd

template <typename Options>
Options adam_options(double lr, Betas betas, double eps, double weight_decay) {
  return Options(lr).betas(std::make_tuple(betas.first, betas.second)).eps(eps)
      .weight_decay(weight_decay);
}

AdamMiniOptions adam_mini_options(double lr, Betas betas, double eps, double weight_decay,
                                  int64_t dim, int64_t n_heads, int64_t n_kv_heads,
                                  int64_t head_dim) {
  return adam_options<AdamMiniOptions>(lr, betas, eps, weight_decay).dim(dim).n_heads(n_heads)
      .n_kv_heads(n_kv_heads).head_dim(head_dim);
}

// The methods both classes share. The optimizer keeps references to the caller's tensors and
// updates them in place.
template <typename Opt, typename Options, typename State>
void bind_common(nb::class_<Opt>& cls) {
  cls.def("step",
          [](Opt& opt, nb::object closure) {
            if (closure.is_none()) return opt.step();
            return opt.step([&closure] {
              nb::object result = closure();
              at::Tensor loss;
              TORCH_CHECK_TYPE(nb::try_cast(result, loss), "step: the closure must return the "
                               "loss as a torch.Tensor, got ", nb::inst_name(result).c_str());
              return loss;
            });
          },
          nb::arg("closure") = nb::none(),
          "One step; `closure` (re-evaluates the loss, calls backward, returns the loss) runs "
          "with grad enabled. Returns the closure's loss, or None.");
  cls.def("zero_grad", [](Opt& opt, bool set_to_none) { opt.zero_grad(set_to_none); },
          nb::arg("set_to_none") = true);
  cls.def("save", [](const Opt& opt, const std::string& path) { torch::save(opt, path); },
          nb::arg("path"), "torch::save(optimizer, path).");
  cls.def("load", [](Opt& opt, const std::string& path) { torch::load(opt, path); },
          nb::arg("path"),
          "torch::load(optimizer, path); raises, changing nothing, on a mismatched checkpoint.");
  cls.def("state",
          [](const Opt& opt, const at::Tensor& param) -> std::optional<StateTuple> {
            auto it = opt.state().find(param.unsafeGetTensorImpl());
            if (it == opt.state().end()) return std::nullopt;
            const auto& s = static_cast<const State&>(*it->second);
            if constexpr (std::is_same_v<State, ParamState>)
              return StateTuple{s.at("step"), s.at("exp_avg"), s.at("exp_avg_sq")};
            else
              return StateTuple{s.step(), s.exp_avg(), s.exp_avg_sq()};
          },
          nb::arg("param"), "(step, exp_avg, exp_avg_sq) of a parameter (live tensors), or None.");
  cls.def("param_groups",
          [](const Opt& opt) {
            std::vector<GroupTuple> out;
            for (const auto& g : opt.param_groups()) {
              const auto& o = static_cast<const Options&>(g.options());
              out.emplace_back(g.params(), o.lr(), o.weight_decay());
            }
            return out;
          },
          "[(params, lr, weight_decay)] per param group.");
}
}  // namespace

void bind_optimizers(nb::module_& m) {
  nb::class_<AdamW> adamw(m, "CppAdamW", "memopt::AdamW, the LibTorch optimizer.");
  adamw.def(
      "__init__",
      [](AdamW* self, std::vector<at::Tensor> params, double lr, Betas betas, double eps,
         double weight_decay) {
        new (self) AdamW(std::move(params),
                         adam_options<AdamWOptions>(lr, betas, eps, weight_decay));
      },
      nb::arg("params"), nb::arg("lr") = 1e-3, nb::arg("betas") = Betas{0.9, 0.999},
      nb::arg("eps") = 1e-8, nb::arg("weight_decay") = 1e-2);
  bind_common<AdamW, AdamWOptions, AdamWParamState>(adamw);

  nb::class_<AdamMini> mini(m, "CppAdamMini",
                            "memopt::AdamMini, the LibTorch optimizer. Roles come from the "
                            "names, or from `roles` (role names as in role_names()) if given.");
  mini.def(
      "__init__",
      [](AdamMini* self, const std::vector<std::pair<std::string, at::Tensor>>& named_params,
         std::optional<std::vector<std::string>> roles, double lr, Betas betas, double eps,
         double weight_decay, int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim) {
        const auto options = adam_mini_options(lr, betas, eps, weight_decay, dim, n_heads,
                                               n_kv_heads, head_dim);
        if (!roles) {
          new (self) AdamMini(named_params, options);
          return;
        }
        TORCH_CHECK_VALUE(roles->size() == named_params.size(), "CppAdamMini: ", roles->size(),
                          " roles for ", named_params.size(), " parameters");
        std::vector<std::pair<at::Tensor, RoleInfo>> params;
        for (size_t i = 0; i < roles->size(); ++i) {
          RoleInfo info;
          info.role = role_from_string((*roles)[i]);
          params.emplace_back(named_params[i].second, info);
        }
        new (self) AdamMini(params, options);
      },
      nb::arg("named_params"), nb::arg("roles") = nb::none(), nb::arg("lr") = 1e-3,
      nb::arg("betas") = Betas{0.9, 0.999}, nb::arg("eps") = 1e-8, nb::arg("weight_decay") = 0.0,
      nb::arg("dim") = 0, nb::arg("n_heads") = 0, nb::arg("n_kv_heads") = 0,
      nb::arg("head_dim") = 0);
  bind_common<AdamMini, AdamMiniOptions, AdamMiniParamState>(mini);

  nb::class_<Apollo> apollo(m, "CppApollo",
                            "memopt::Apollo (memopt::ApolloMini with mini=True), the LibTorch "
                            "optimizer: attention/MLP weights projected, the rest AdamW.");
  apollo.def(
      "__init__",
      [](Apollo* self, const std::vector<std::pair<std::string, at::Tensor>>& named_params,
         bool mini, double lr, Betas betas, double eps, double weight_decay,
         std::optional<int64_t> rank, std::string proj, std::string proj_type,
         std::optional<std::string> scale_type, int64_t update_proj_gap,
         std::optional<double> scale, double norm_growth_limit, bool scale_front,
         bool store_projection, std::string adamw_rule) {
        ApolloOptions o = mini ? ApolloOptions::mini(lr) : ApolloOptions(lr);
        o.betas(std::make_tuple(betas.first, betas.second)).eps(eps).weight_decay(weight_decay)
            .proj(std::move(proj)).proj_type(std::move(proj_type))
            .update_proj_gap(update_proj_gap).norm_growth_limit(norm_growth_limit)
            .scale_front(scale_front).store_projection(store_projection)
            .adamw_rule(std::move(adamw_rule));
        if (rank) o.rank(*rank);
        if (scale_type) o.scale_type(*scale_type);
        if (scale) o.scale(*scale);
        if (mini) new (self) ApolloMini(named_params, o);
        else new (self) Apollo(named_params, o);
      },
      nb::arg("named_params"), nb::arg("mini") = false, nb::arg("lr") = 1e-3,
      nb::arg("betas") = Betas{0.9, 0.999}, nb::arg("eps") = 1e-6, nb::arg("weight_decay") = 0.0,
      nb::arg("rank") = nb::none(), nb::arg("proj") = "random", nb::arg("proj_type") = "std",
      nb::arg("scale_type") = nb::none(), nb::arg("update_proj_gap") = 200,
      nb::arg("scale") = nb::none(), nb::arg("norm_growth_limit") = 1.01,
      nb::arg("scale_front") = false, nb::arg("store_projection") = true,
      nb::arg("adamw_rule") = "apollo");
  apollo.def("add_param_group",
             [](Apollo& opt, std::vector<at::Tensor> params, int64_t rank, double lr) {
               opt.add_param_group(torch::optim::OptimizerParamGroup(
                   std::move(params), std::make_unique<ApolloOptions>(ApolloOptions(lr).rank(rank))));
             },
             nb::arg("params"), nb::arg("rank"), nb::arg("lr"),
             "add_param_group with the group's own ApolloOptions (rank, lr; other keys default).");
  apollo.def("extra_state",
             [](const Apollo& opt, const at::Tensor& param) {
               auto it = opt.state().find(param.unsafeGetTensorImpl());
               TORCH_CHECK_VALUE(it != opt.state().end(), "no state for this parameter");
               const auto& s = static_cast<const ApolloParamState&>(*it->second);
               return std::make_tuple(s.proj(), s.seed(), s.limiter_norm());
             },
             nb::arg("param"), "(proj, seed, limiter_norm); undefined ones are None.");
  bind_common<Apollo, ApolloOptions, ApolloParamState>(apollo);

  nb::class_<Frugal> frugal(m, "CppFrugal", "memopt::Frugal, the LibTorch optimizer.");
  frugal.def(
      "__init__",
      [](Frugal* self, const std::vector<std::pair<std::string, at::Tensor>>& named_params,
         double lr, Betas betas, double eps, double weight_decay, double density,
         int64_t update_gap, std::string selection, std::string block_order,
         std::string state_free, double state_free_lr_scale, double proj_params_lr_scale,
         bool reset_statistics, std::optional<int64_t> seed, bool proj_embeds, bool proj_norms,
         bool proj_logits) {
        FrugalOptions o(lr);
        o.betas(std::make_tuple(betas.first, betas.second)).eps(eps).weight_decay(weight_decay)
            .state_free_lr_scale(state_free_lr_scale).proj_params_lr_scale(proj_params_lr_scale);
        FrugalConfig c{density, update_gap, std::move(selection), std::move(block_order),
                       std::move(state_free), reset_statistics, seed, proj_embeds, proj_norms,
                       proj_logits};
        new (self) Frugal(named_params, o, std::move(c));
      },
      nb::arg("named_params"), nb::arg("lr") = 1e-3, nb::arg("betas") = Betas{0.9, 0.999},
      nb::arg("eps") = 1e-8, nb::arg("weight_decay") = 0.0, nb::arg("density") = 0.25,
      nb::arg("update_gap") = 200, nb::arg("selection") = "block",
      nb::arg("block_order") = "descending", nb::arg("state_free") = "sign_sgd",
      nb::arg("state_free_lr_scale") = 1.0, nb::arg("proj_params_lr_scale") = 1.0,
      nb::arg("reset_statistics") = true, nb::arg("seed") = nb::none(),
      nb::arg("proj_embeds") = false, nb::arg("proj_norms") = false,
      nb::arg("proj_logits") = false);
  frugal.def("subspace",
             [](const Frugal& opt, const at::Tensor& param) {
               auto it = opt.state().find(param.unsafeGetTensorImpl());
               TORCH_CHECK_VALUE(it != opt.state().end(), "no state for this parameter");
               const auto& s = static_cast<const ParamState&>(*it->second);
               return s.has("subspace") ? s.at("subspace") : at::Tensor();
             },
             nb::arg("param"), "The parameter's subspace tensor (None for block selection).");
  frugal.def("active_blocks", &Frugal::active_blocks);
  bind_common<Frugal, FrugalOptions, ParamState>(frugal);
}
