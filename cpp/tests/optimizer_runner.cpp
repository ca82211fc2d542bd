// optimizer_runner: runs jobs on memopt's LibTorch optimizers for the Python tests
// (tests/cpp_runner.py writes the jobs, checks the results against Python oracles), so that the
// production extension needs no binding of these classes. Test-only: built beside the ctest
// programs, never installed. Requests come on stdin (see main).
//
// JOBS (torch.save of a list of dicts): "optimizer" ("adamw" | "adam_mini" | "apollo" |
// "apollo_mini" | "frugal"), "params" [(name, tensor)], "options" {key: value} (FrugalConfig's
// keys too), optional "roles" [role name] (instead of the names'), optional "groups"
// [{"params": [index], "options"}] (AdamW, Apollo), and "actions", each one of
//   {"do": "step", "grads": [tensor | None] (left out: keep them), "sparse": [index of a
//    gradient to make sparse], "closure": bool}
//   {"do": "save" | "load", "path": str}
//   {"do": "add_param_group", "params": [tensor], "options": {...}}
// An action with "may_fail" records its error and the job goes on; any other error ends it.
// RESULTS (torch::pickle_save, one per job): {"error" (construction), "actions": [{"error",
// "params" (after the action), "groups" [(lr, weight_decay, [index])], "loss", ...}]}; an error
// is "<the Python exception _C would raise>: message", or "JobError: ..." for a bad job.
#include <torch/serialize.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <memopt/frugal_optimizer.h>
#include <memopt/optimizers.h>
#include <memopt/roles.h>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {
using c10::IValue;
using Dict = c10::impl::GenericDict;
using Named = std::vector<std::pair<std::string, at::Tensor>>;

// A malformed job: the runner's fault or the test's, never an optimizer's error.
struct JobError : std::runtime_error { using std::runtime_error::runtime_error; };

IValue get(const Dict& d, const std::string& key) {
  if (!d.contains(key)) throw JobError("job: missing key '" + key + "'");
  return d.at(key);
}
IValue get_or(const Dict& d, const std::string& key, IValue fallback) {
  return d.contains(key) ? d.at(key) : std::move(fallback);
}
double num(const IValue& v) { return v.isInt() ? static_cast<double>(v.toInt()) : v.toDouble(); }
int64_t integer(const IValue& v) { return v.toInt(); }
bool flag(const IValue& v) { return v.toBool(); }
std::string text(const IValue& v) { return v.toStringRef(); }
c10::ArrayRef<IValue> items(const IValue& v) {
  return v.isTuple() ? v.toTupleRef().elements() : v.toListRef();
}
std::tuple<double, double> pair(const IValue& v) { return {num(items(v)[0]), num(items(v)[1])}; }
std::optional<int64_t> maybe(const IValue& v) {
  return v.isNone() ? std::nullopt : std::optional<int64_t>(v.toInt());
}

// Option keys by name, through each class's own setters (so that defaults such as
// ApolloOptions::mini()'s stay unless a key overrides them). False: not a key of that class.
#define MEMOPT_KEY(key, convert) if (k == #key) return o.key(convert(v)), true;
#define MEMOPT_FIELD(key, convert) if (k == #key) return o.key = convert(v), true;
template <typename O>
bool set_adam(O& o, const std::string& k, const IValue& v) {
  MEMOPT_KEY(lr, num) MEMOPT_KEY(betas, pair) MEMOPT_KEY(eps, num)
  MEMOPT_KEY(weight_decay, num) MEMOPT_KEY(nonfinite, text)
  MEMOPT_KEY(stochastic_rounding, flag) MEMOPT_KEY(rounding_seed, integer)
  MEMOPT_KEY(state_bits, integer)
  return false;
}
bool set(memopt::AdamWOptions& o, const std::string& k, const IValue& v) {
  return set_adam(o, k, v);
}
bool set(memopt::AdamMiniOptions& o, const std::string& k, const IValue& v) {
  MEMOPT_KEY(dim, integer) MEMOPT_KEY(n_heads, integer) MEMOPT_KEY(n_kv_heads, integer)
  MEMOPT_KEY(head_dim, integer)
  return set_adam(o, k, v);
}
bool set(memopt::ApolloOptions& o, const std::string& k, const IValue& v) {
  MEMOPT_KEY(rank, integer) MEMOPT_KEY(proj, text) MEMOPT_KEY(proj_type, text)
  MEMOPT_KEY(scale_type, text) MEMOPT_KEY(update_proj_gap, integer) MEMOPT_KEY(scale, num)
  MEMOPT_KEY(norm_growth_limit, num) MEMOPT_KEY(scale_front, flag)
  MEMOPT_KEY(store_projection, flag) MEMOPT_KEY(adamw_rule, text) MEMOPT_KEY(embeddings, text)
  return set_adam(o, k, v);
}
bool set(memopt::FrugalOptions& o, const std::string& k, const IValue& v) {
  MEMOPT_KEY(proj_params_lr_scale, num) MEMOPT_KEY(state_free_lr_scale, num)
  return set_adam(o, k, v);
}
bool set(memopt::FrugalConfig& o, const std::string& k, const IValue& v) {
  MEMOPT_FIELD(density, num) MEMOPT_FIELD(update_gap, integer) MEMOPT_FIELD(selection, text)
  MEMOPT_FIELD(block_order, text) MEMOPT_FIELD(state_free, text)
  MEMOPT_FIELD(reset_statistics, flag) MEMOPT_FIELD(seed, maybe) MEMOPT_FIELD(proj_embeds, flag)
  MEMOPT_FIELD(proj_norms, flag) MEMOPT_FIELD(proj_logits, flag)
  MEMOPT_FIELD(embeddings, text)
  return false;
}

// `o` with the dict's keys applied; an unknown key is a JobError (a misspelt option must not
// pass silently as the default).
template <typename O>
O with(O o, const Dict& keys, memopt::FrugalConfig* config = nullptr) {
  for (const auto& kv : keys) {
    const auto& k = kv.key().toStringRef();
    if (!set(o, k, kv.value()) && !(config && set(*config, k, kv.value())))
      throw JobError("job: unknown option '" + k + "'");
  }
  return o;
}

// The optimizer and what the result reports of it, whatever its class.
struct Run {
  virtual ~Run() = default;
  virtual torch::optim::Optimizer& opt() = 0;
  virtual IValue groups() const = 0;  // [(lr, weight_decay, [param index])]
  virtual void add_group(std::vector<at::Tensor> params, const Dict& keys) = 0;
  std::vector<at::Tensor> params;  // the job's, then those of added groups
};

template <typename Opt, typename O>
struct RunOf : Run {
  RunOf(std::unique_ptr<Opt> o, std::vector<at::Tensor> ps, O d)
      : optimizer(std::move(o)), defaults(std::move(d)) {
    params = std::move(ps);
  }
  torch::optim::Optimizer& opt() override { return *optimizer; }
  IValue groups() const override {
    c10::impl::GenericList out(c10::AnyType::get());
    for (const auto& g : optimizer->param_groups()) {
      std::vector<int64_t> index;
      for (const auto& p : g.params())
        for (size_t i = 0; i < params.size(); ++i)
          if (params[i].is_same(p)) index.push_back(static_cast<int64_t>(i));
      const auto& o = static_cast<const O&>(g.options());
      out.push_back(c10::ivalue::Tuple::create({o.lr(), o.weight_decay(), index}));
    }
    return out;
  }
  // torch.optim's rule: a new group's missing keys come from the optimizer's defaults.
  void add_group(std::vector<at::Tensor> ps, const Dict& keys) override {
    optimizer->add_param_group(
        torch::optim::OptimizerParamGroup(ps, std::make_unique<O>(with(defaults, keys))));
    params.insert(params.end(), ps.begin(), ps.end());
  }
  std::unique_ptr<Opt> optimizer;
  O defaults;
};

template <typename Opt, typename O>
std::unique_ptr<Run> wrap(std::unique_ptr<Opt> opt, std::vector<at::Tensor> params, O defaults) {
  return std::make_unique<RunOf<Opt, O>>(std::move(opt), std::move(params), std::move(defaults));
}

template <typename O>
std::vector<torch::optim::OptimizerParamGroup> param_groups(const IValue& groups,
                                                            const std::vector<at::Tensor>& ps,
                                                            const O& defaults) {
  std::vector<torch::optim::OptimizerParamGroup> out;
  for (const auto& g : groups.toListRef()) {
    std::vector<at::Tensor> members;
    const auto group = g.toGenericDict();
    for (const auto& i : get(group, "params").toListRef()) {
      if (i.toInt() < 0 || i.toInt() >= static_cast<int64_t>(ps.size()))
        throw JobError("job: a group's parameter index is out of range");
      members.push_back(ps[i.toInt()]);
    }
    const auto options = with(defaults, get(group, "options").toGenericDict());
    out.emplace_back(members, std::make_unique<O>(options));
  }
  return out;
}

// AdamW and Apollo: the job's explicit groups, each with its own options, or `plain`.
template <typename Opt, typename O, typename Plain>
std::unique_ptr<Run> grouped(const IValue& groups, const Plain& plain,
                             const std::vector<at::Tensor>& ps, const O& o) {
  return wrap(groups.isNone() ? std::make_unique<Opt>(plain, o)
                              : std::make_unique<Opt>(param_groups(groups, ps, o), o),
              ps, o);
}

template <typename R, typename Convert>
std::vector<std::pair<at::Tensor, R>> with_roles(const Named& named, const IValue& roles,
                                                    const Convert& convert) {
  const auto r = roles.toListRef();
  if (r.size() != named.size()) throw JobError("job: one role per parameter");
  std::vector<std::pair<at::Tensor, R>> out;
  for (size_t i = 0; i < r.size(); ++i)
    out.emplace_back(named[i].second, convert(memopt::role_from_string(r[i].toStringRef())));
  return out;
}

std::unique_ptr<Run> make(const Dict& job) {
  using namespace memopt;
  const auto name = get(job, "optimizer").toStringRef();
  const auto keys = get_or(job, "options", Dict(c10::StringType::get(), c10::AnyType::get()))
                        .toGenericDict();
  const auto roles = get_or(job, "roles", IValue()), groups = get_or(job, "groups", IValue());
  Named named;
  for (const auto& item : get(job, "params").toListRef())
    named.emplace_back(items(item)[0].toStringRef(), items(item)[1].toTensor());
  std::vector<at::Tensor> ps;
  for (auto& [n, p] : named) ps.push_back(p.requires_grad_(true));  // as a model's parameters
  if ((!roles.isNone() && name != "adam_mini" && name != "frugal") ||
      (!groups.isNone() && name != "adamw" && name != "apollo"))
    throw JobError("job: " + name + " takes no roles or groups here");

  if (name == "adamw") return grouped<AdamW>(groups, ps, ps, with(AdamWOptions(), keys));
  if (name == "adam_mini") {
    const auto o = with(AdamMiniOptions(), keys);
    if (roles.isNone()) return wrap(std::make_unique<AdamMini>(named, o), ps, o);
    const auto to_info = [](Role role) { RoleInfo info; info.role = role; return info; };
    return wrap(std::make_unique<AdamMini>(with_roles<RoleInfo>(named, roles, to_info), o), ps, o);
  }
  if (name == "apollo") return grouped<Apollo>(groups, named, ps, with(ApolloOptions(), keys));
  if (name == "apollo_mini") {
    const auto o = with(ApolloOptions::mini(), keys);
    return wrap(std::make_unique<ApolloMini>(named, o), ps, o);
  }
  if (name == "frugal") {
    FrugalConfig c;
    const auto o = with(FrugalOptions(), keys, &c);
    if (roles.isNone()) return wrap(std::make_unique<Frugal>(named, o, c), ps, o);
    const auto same = [](Role role) { return role; };
    return wrap(std::make_unique<Frugal>(with_roles<Role>(named, roles, same), o, c), ps, o);
  }
  throw JobError("job: unknown optimizer '" + name + "'");
}

// The closure of a closure step: the loss sum(p^2) over every parameter, backward, the loss.
at::Tensor sum_of_squares(Run& r, bool& grad_enabled) {
  grad_enabled = at::GradMode::is_enabled();
  r.opt().zero_grad();
  auto loss = at::zeros({});
  for (const auto& p : r.params) loss = loss + p.pow(2).sum();
  loss.backward();
  return loss;
}

// Runs one action; fills `out` with what it returned.
void act(Run& r, const Dict& a, Dict& out) {
  const auto what = get(a, "do").toStringRef();
  if (what == "step") {
    if (a.contains("grads")) {  // else the gradients stay (a closure's, say)
      const auto grads = a.at("grads").toListRef();
      if (grads.size() != r.params.size()) throw JobError("job: one gradient per parameter");
      for (size_t i = 0; i < grads.size(); ++i)
        r.params[i].mutable_grad() = grads[i].isNone() ? at::Tensor() : grads[i].toTensor();
      // Sparse tensors do not survive the pickle: these gradients are made sparse here.
      for (const auto& i : get_or(a, "sparse", c10::List<int64_t>()).toListRef())
        r.params.at(i.toInt()).mutable_grad() = r.params.at(i.toInt()).grad().to_sparse();
    }
    if (!get_or(a, "closure", false).toBool()) {
      const auto loss = r.opt().step();  // undefined without a closure
      out.insert("loss", loss.defined() ? IValue(loss) : IValue());
      return;
    }
    bool grad_enabled = false;
    at::NoGradGuard no_grad;  // the optimizer must enable grad for the closure itself
    auto loss = r.opt().step([&] { return sum_of_squares(r, grad_enabled); });
    out.insert("grad_enabled", grad_enabled);
    out.insert("loss_requires_grad", loss.requires_grad());
    out.insert("loss", loss.detach());
  } else if (what == "save") {
    torch::save(r.opt(), get(a, "path").toStringRef());
  } else if (what == "load") {
    torch::load(r.opt(), get(a, "path").toStringRef());
  } else if (what == "add_param_group") {
    std::vector<at::Tensor> params;
    for (const auto& p : get(a, "params").toListRef()) params.push_back(p.toTensor());
    for (auto& p : params) p.requires_grad_(true);
    r.add_group(std::move(params), get(a, "options").toGenericDict());
  } else {
    throw JobError("job: unknown action '" + what + "'");
  }
}

// The Python exception module.cpp's translator makes of a c10 error.
const char* python_name(const c10::Error& x) {
  if (dynamic_cast<const c10::ValueError*>(&x)) return "ValueError";
  if (dynamic_cast<const c10::TypeError*>(&x)) return "TypeError";
  if (dynamic_cast<const c10::IndexError*>(&x)) return "IndexError";
  if (dynamic_cast<const c10::NotImplementedError*>(&x)) return "NotImplementedError";
  return "RuntimeError";
}

// An error as "<the Python exception _C would raise>: message", or "JobError: ..." for a bad job.
std::string describe(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const c10::Error& x) {
    return std::string(python_name(x)) + ": " + x.what_without_backtrace();
  } catch (const JobError& x) {
    return std::string("JobError: ") + x.what();
  } catch (const std::exception& x) {  // nanobind's translation of any other exception
    return std::string("RuntimeError: ") + x.what();
  }
}

Dict run(const Dict& job) {
  Dict result(c10::StringType::get(), c10::AnyType::get());
  c10::impl::GenericList done(c10::AnyType::get());
  result.insert("actions", done);
  result.insert("error", IValue());
  std::unique_ptr<Run> r;
  try {
    r = make(job);
  } catch (...) {
    result.insert_or_assign("error", describe(std::current_exception()));
    return result;
  }
  for (const auto& action : get(job, "actions").toListRef()) {
    const auto a = action.toGenericDict();
    Dict out(c10::StringType::get(), c10::AnyType::get());
    out.insert("error", IValue());
    try {
      act(*r, a, out);
    } catch (...) {
      out.insert_or_assign("error", describe(std::current_exception()));
    }
    std::vector<at::Tensor> now;
    for (const auto& p : r->params) now.push_back(p.detach().clone());  // keeps the layout
    out.insert("params", now);
    out.insert("groups", r->groups());
    done.push_back(out);
    // An error nobody expected ends the job: later actions would only report its consequences.
    if (!out.at("error").isNone() && !get_or(a, "may_fail", false).toBool()) break;
  }
  return result;
}
}  // namespace

// Serves requests until stdin closes, one a line: "JOBS<tab>RESULTS", the paths of a job file
// (a list of jobs: several optimizers a test compares) and of the file to write their results
// to, then answers "done" on stdout. One process for a whole pytest session: starting LibTorch
// (its operator registrations) costs more CPU than most jobs.
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    const auto tab = line.find('\t');
    if (tab == std::string::npos) {
      std::cerr << "optimizer_runner: expected \"JOBS<tab>RESULTS\", got \"" << line << "\"\n";
      return 2;
    }
    std::ifstream in(line.substr(0, tab), std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
    c10::impl::GenericList results(c10::AnyType::get());
    const auto jobs = torch::pickle_load(bytes);  // owns the list the loop reads
    for (const auto& job : jobs.toListRef()) results.push_back(run(job.toGenericDict()));
    const auto out = torch::pickle_save(results);
    std::ofstream(line.substr(tab + 1), std::ios::binary)
        .write(out.data(), static_cast<std::streamsize>(out.size()));
    std::cout << "done" << std::endl;
  }
  return 0;
}
