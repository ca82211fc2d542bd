// memopt::FrugalPlan's saved selection (frugal_plan.h): what a checkpoint stores, and every
// check a saved selection passes before a front end adopts it, so that a damaged or foreign
// checkpoint raises a ValueError naming the field and changes nothing, in either front end.
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cstdio>

#include "memopt/frugal_plan.h"

namespace memopt {

namespace {

bool contains(const std::vector<int64_t>& v, int64_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

// A saved value as Python's repr() writes it, so that messages read the same from both front
// ends (and "density=1.0" is not "density=1").
std::string repr(const c10::IValue& v) {
  if (v.isNone()) return "None";
  if (v.isBool()) return v.toBool() ? "True" : "False";
  if (v.isInt()) return std::to_string(v.toInt());
  if (v.isString()) return "'" + v.toStringRef() + "'";
  if (v.isTensor()) return "a tensor of shape " + c10::str(v.toTensor().sizes());
  if (v.isDouble()) {  // the shortest text that reads back as the same double
    const double d = v.toDouble();
    if (!std::isfinite(d)) return std::isnan(d) ? "nan" : d > 0 ? "inf" : "-inf";
    char buf[32];
    for (int digits = 1; digits <= 17; ++digits) {
      std::snprintf(buf, sizeof(buf), "%.*g", digits, d);
      if (std::strtod(buf, nullptr) == d) break;
    }
    std::string s = buf;
    return s.find_first_of(".e") == std::string::npos ? s + ".0" : s;
  }
  if (v.isList()) {
    std::string s = "[";
    for (const auto& e : v.toListRef()) s += (s.size() > 1 ? ", " : "") + repr(e);
    return s + "]";
  }
  return v.tagKind();
}

[[noreturn]] void damaged(const std::string& what) {
  TORCH_CHECK_VALUE(false, "Frugal checkpoint: ", what, "; it was damaged or written by another "
                    "configuration, so nothing was loaded");
  __builtin_unreachable();
}

bool is_int(const c10::IValue& v, int64_t lo, std::optional<int64_t> hi = std::nullopt) {
  return v.isInt() && v.toInt() >= lo && (!hi || v.toInt() < *hi);
}

// A list of ints, each in [lo, hi), unique unless `repeats`, of `length` entries if given.
std::vector<int64_t> read_list(const std::string& key, const c10::IValue& v, int64_t lo,
                               std::optional<int64_t> hi, bool repeats,
                               std::optional<int64_t> length) {
  if (!v.isList()) damaged(key + " must be a list, got " + v.tagKind());
  std::vector<int64_t> out;
  for (const auto& e : v.toListRef()) {
    if (!is_int(e, lo, hi))
      damaged(key + " holds an entry that is not a projectable tensor's (" + repr(v) + ")");
    out.push_back(e.toInt());
  }
  auto sorted = out;
  std::sort(sorted.begin(), sorted.end());
  if (!repeats && std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
    damaged(key + " names a tensor twice (" + repr(v) + ")");
  if (length && static_cast<int64_t>(out.size()) != *length)
    damaged(key + " has " + std::to_string(out.size()) + " entries, this optimizer needs " +
            std::to_string(*length));
  return out;
}

}  // namespace

const std::vector<std::string>& FrugalPlan::saved_keys() {
  static const std::vector<std::string> keys = {"t", "rng", "cursor", "active", "block_cycle",
                                                "cycle", "selection", "num_projectable",
                                                "density", "held"};
  return keys;
}

FrugalSavedFields FrugalPlan::save(const std::vector<int64_t>& holding) const {
  const auto& s = selection_;
  auto held = holding;
  std::sort(held.begin(), held.end());
  return {{"t", s.t}, {"rng", s.rng.clone()}, {"cursor", s.cursor}, {"active", s.active},
          {"block_cycle", s.block_cycle}, {"cycle", s.cycle}, {"selection", config_.selection},
          {"num_projectable", num_projectable()}, {"density", config_.density}, {"held", held}};
}

FrugalSelection FrugalPlan::read(const FrugalSavedFields& saved) const {
  auto find = [&](const std::string& key) -> const c10::IValue* {
    for (const auto& [k, v] : saved)
      if (k == key) return &v;
    return nullptr;
  };
  const int64_t n = num_projectable();
  const auto* sel = find("selection");
  const auto* num = find("num_projectable");
  TORCH_CHECK_VALUE(sel && sel->isString() && sel->toStringRef() == config_.selection && num &&
                        num->isInt() && num->toInt() == n,
                    "not a checkpoint of a Frugal optimizer with selection='", config_.selection,
                    "' and ", n, " projectable tensors");
  std::vector<std::string> missing;
  for (const char* key : {"t", "cursor", "active", "block_cycle", "cycle", "rng"})
    if (!find(key)) missing.push_back(key);
  if (!missing.empty()) damaged("the selection lacks " + c10::Join(", ", missing));
  const auto* density = find("density");  // checkpoints from before it was saved lack it
  if (density && !((density->isDouble() || density->isInt()) &&
                   density->toScalar().toDouble() == config_.density))
    damaged("saved with density=" + repr(*density) + ", this optimizer has density=" +
            repr(config_.density));
  FrugalSelection out;
  for (const char* key : {"t", "block_cycle"})
    if (!is_int(*find(key), 0))
      damaged(std::string(key) + " must be an int >= 0, got " + repr(*find(key)));
  if (!is_int(*find("cursor"), -1, n))
    damaged("cursor must be an int in [-1, " + std::to_string(n) + "), got " +
            repr(*find("cursor")));
  out.t = find("t")->toInt();
  out.block_cycle = find("block_cycle")->toInt();
  out.cursor = find("cursor")->toInt();
  out.active = read_list("active", *find("active"), 0, n, false, block_ ? k_blocks_ : 0);
  out.cycle = read_list("cycle", *find("cycle"), -1, std::nullopt, true, n);
  const auto* held = find("held");
  if (held && !held->isNone()) out.held = read_list("held", *held, 0, n, false, std::nullopt);
  const auto& rng = *find("rng");
  try {
    TORCH_CHECK_VALUE(rng.isTensor(), "got ", repr(rng));
    at::make_generator<at::CPUGeneratorImpl>().set_state(rng.toTensor());
  } catch (const c10::Error& e) {
    damaged(std::string("rng is not a torch generator state (") + e.what_without_backtrace() + ")");
  }
  out.rng = rng.toTensor().clone();
  return out;
}

void FrugalPlan::adopt(FrugalSelection sel) {
  sel.held.reset();
  selection_ = std::move(sel);
}

std::optional<std::vector<int64_t>> FrugalPlan::holders(const FrugalSelection& sel,
                                                        const std::vector<int64_t>& holding) const {
  if (!block_) return std::nullopt;
  std::vector<int64_t> out;
  for (int64_t j = 0; j < num_projectable(); ++j)
    if (mode(j, sel) != FrugalMode::FreeBlock && contains(sel.held ? *sel.held : holding, j))
      out.push_back(j);
  return out;
}

void FrugalPlan::check_loaded(int64_t j, const FrugalSelection& sel, bool has_state,
                              const std::optional<std::vector<int64_t>>& subspace) const {
  const FrugalMode m = mode(j, sel);
  const at::IntArrayRef shape(shapes_[j]);
  TORCH_CHECK_VALUE(!has_state || m != FrugalMode::FreeBlock, "loaded state has state for a "
                    "tensor of shape ", shape, " that FRUGAL keeps state-free now");
  TORCH_CHECK_VALUE(!sel.held || has_state == contains(*sel.held, j), "loaded state ",
                    has_state ? "has" : "lacks", " the moments of a projectable ", shape,
                    " tensor that the saved selection says it ",
                    has_state ? "does not hold" : "holds", ": a DCP or flattened state dict was "
                    "made with another selection's layout. Load with opt.load_checkpoint(model, "
                    "path), or call opt.load_selection(sd) before get_optimizer_state_dict");
  const auto expected = subspace_shape(j, m);
  TORCH_CHECK_VALUE(!has_state || !expected || (subspace && *subspace == *expected),
                    "loaded subspace of a ", shape, " tensor must have shape ",
                    at::IntArrayRef(expected ? *expected : std::vector<int64_t>{}));
}

}  // namespace memopt
