// memopt::FrugalPlan (frugal_plan.h): FRUGAL's decisions for both front ends, in upstream's
// order of random draws (proj_optimizer_templates.py), so that the Python and LibTorch
// optimizers and a resumed run make the same choices.
#include "memopt/frugal_plan.h"
#include "memopt/state_codes.h"
#include <functional>
#include <numeric>
#include "memopt/projection.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

namespace memopt {

namespace {

const std::vector<std::string> kSelections = {"block", "columns", "rows", "randk",
                                              "svd", "random", "randperm"};

bool contains(const std::vector<int64_t>& v, int64_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

bool is_index_mode(FrugalMode m) {
  return m == FrugalMode::Columns || m == FrugalMode::Rows || m == FrugalMode::RandK;
}

}  // namespace

bool frugal_projectable(const FrugalTensor& t, const FrugalConfig& c) {
  // attention and MLP weights (role_traits), also a q/k that fell back to Linear for want of
  // heads; embeddings, norms and the head when asked
  if (role_traits(t.role).attention_or_mlp || (t.role == Role::Linear && t.heads_unknown))
    return t.shape.size() == 2;
  switch (t.role) {
    case Role::Embedding: return c.proj_embeds;
    case Role::Norm: return c.proj_norms;
    case Role::Output: return c.proj_logits;
    default: return false;
  }
}

FrugalPlan::FrugalPlan(const std::vector<FrugalTensor>& tensors, FrugalConfig config)
    : config_(std::move(config)) {
  const auto& c = config_;
  check_state_bits(c.state_bits);
  TORCH_CHECK_VALUE(std::isfinite(c.density) && c.density >= 0.0 && c.density <= 1.0,
                    "Frugal: density must be in [0, 1], got ", c.density);
  TORCH_CHECK_VALUE(c.update_gap >= 1, "Frugal: update_gap must be a positive int, got ",
                    c.update_gap);
  TORCH_CHECK_VALUE(std::find(kSelections.begin(), kSelections.end(), c.selection) !=
                        kSelections.end(), "Frugal: selection must be one of block, columns, "
                    "rows, randk, svd, random, randperm; got '", c.selection, "'");
  // 8-bit codes need whole-tensor moments (the block selection's active blocks and the AdamW
  // tensors): the other selections keep moments of a subset or a projection.
  TORCH_CHECK_NOT_IMPLEMENTED(c.state_bits != 8 || c.selection == "block", "Frugal: "
                              "state_bits=8 takes selection='block' (whole-tensor moments); "
                              "selection='", c.selection, "' keeps moments of a subspace, in "
                              "state_bits=16 or 32");
  if (c.state_free == "none") rule_ = FrugalRule::None;
  else if (c.state_free == "sgd") rule_ = FrugalRule::Sgd;
  else TORCH_CHECK_VALUE(c.state_free == "sign_sgd", "Frugal: state_free must be 'sign_sgd', "
                         "'sgd' or 'none' (None in Python), got '", c.state_free, "'");
  TORCH_CHECK_VALUE(c.embeddings == "adamw" || c.embeddings == "adam_mini", "Frugal: "
                    "embeddings must be 'adamw' or 'adam_mini' (per-token v), got '",
                    c.embeddings, "'");
  block_ = c.selection == "block";
  for (size_t i = 0; i < tensors.size(); ++i) {
    shapes_all_.push_back(tensors[i].shape);
    const bool projectable = frugal_projectable(tensors[i], c);
    const Role r = tensors[i].role;
    per_row_.push_back(c.embeddings == "adam_mini" && !projectable &&
                       (r == Role::Embedding || r == Role::Output));
    block_of_.push_back(projectable ? static_cast<int64_t>(projectable_.size()) : -1);
    if (!projectable) continue;
    projectable_.push_back(static_cast<int64_t>(i));
    shapes_.push_back(tensors[i].shape);
    geometry_.push_back(block_ ? Geometry{} : geometry(tensors[i]));
  }
  const int64_t n = num_projectable();
  // from torch's global generator, so torch.manual_seed reproduces an unseeded optimizer
  const int64_t seed = c.seed ? *c.seed
                              : at::randint(0, int64_t{1} << 62, {1}, at::kLong).item<int64_t>();
  selection_.rng = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed))
                       .get_state();
  selection_.cycle.assign(n, -1);
  k_blocks_ = frugal_round(static_cast<double>(n) * c.density);
  if (block_)  // chosen now, so that the layout (and describe(), planning) is known before a step
    selection_.active = frugal_select_blocks(n, k_blocks_, c.block_order, selection_.cursor,
                                             selection_.rng);
}

FrugalPlan::Geometry FrugalPlan::geometry(const FrugalTensor& t) const {
  const auto& sel = config_.selection;
  const double d = config_.density;
  Geometry g;
  if (sel == "randk") {
    int64_t numel = 1;
    for (int64_t s : t.shape) numel *= s;
    g.total = numel;
    g.k = static_cast<int64_t>(static_cast<double>(numel) * d);  // int(): toward zero
    g.mode = FrugalMode::RandK;
    g.moments = g.subspace = {g.k};
  } else {
    TORCH_CHECK_VALUE(t.shape.size() == 2, "Frugal: selection='", sel, "' needs 2-D projectable "
                      "tensors; ", t.name, " has shape ", at::IntArrayRef(t.shape),
                      " (use selection='block' or 'randk')");
    const int64_t rows = t.shape[0], cols = t.shape[1];
    if (sel == "columns" || sel == "rows") {
      const bool by_cols = sel == "columns";
      g.total = by_cols ? cols : rows;
      g.k = static_cast<int64_t>(static_cast<double>(g.total) * d);
      g.mode = by_cols ? FrugalMode::Columns : FrugalMode::Rows;
      g.moments = by_cols ? std::vector<int64_t>{rows, g.k} : std::vector<int64_t>{g.k, cols};
      g.subspace = {g.k};
    } else {  // a projection on GaLore's 'std' side: compress the smaller dimension
      const bool right = std_side(rows, cols) == ProjSide::Right;
      g.k = frugal_round(static_cast<double>(right ? cols : rows) * d);
      g.mode = right ? FrugalMode::ProjRight : FrugalMode::ProjLeft;
      g.moments = right ? std::vector<int64_t>{rows, g.k} : std::vector<int64_t>{g.k, cols};
      g.subspace = right ? std::vector<int64_t>{g.k, cols} : std::vector<int64_t>{rows, g.k};
    }
  }
  if (g.k == 0) g.mode = FrugalMode::FreeBlock;  // an empty subspace: state-free only
  return g;
}

FrugalMode FrugalPlan::mode(int64_t j, const FrugalSelection& sel) const {
  TORCH_CHECK_INDEX(j >= 0 && j < num_projectable(), "Frugal: no projectable tensor ", j);
  if (!block_) return geometry_[j].mode;
  return contains(sel.active, j) ? FrugalMode::ActiveBlock : FrugalMode::FreeBlock;
}

std::optional<std::vector<int64_t>> FrugalPlan::moment_shape(int64_t j, FrugalMode m) const {
  if (m == FrugalMode::FreeBlock) return std::nullopt;
  if (m == FrugalMode::ActiveBlock || m == FrugalMode::Adam) return shapes_.at(j);
  return geometry_.at(j).moments;
}

std::optional<std::vector<int64_t>> FrugalPlan::subspace_shape(int64_t j, FrugalMode m) const {
  if (m == FrugalMode::FreeBlock || m == FrugalMode::ActiveBlock || m == FrugalMode::Adam)
    return std::nullopt;
  return geometry_.at(j).subspace;
}

void FrugalPlan::add_adamw(const std::vector<std::vector<int64_t>>& shapes) {
  for (const auto& shape : shapes) {
    shapes_all_.push_back(shape);
    block_of_.push_back(-1);
    per_row_.push_back(false);
  }
}

StateLayout FrugalPlan::state(int64_t i, const FrugalSelection& sel) const {
  const int64_t j = block(i);
  return layout(i, j < 0 ? FrugalMode::Adam : mode(j, sel));
}

StateLayout FrugalPlan::layout(int64_t i, FrugalMode m) const {
  const auto& shape = shapes_all_.at(i);
  const int64_t j = block(i);
  const auto moments = j < 0 ? std::optional(shape) : moment_shape(j, m);
  if (!moments) return {};
  // Under FSDP2 (rows): whole-tensor moments split like the parameter, (rows, k) moments of
  // column / right-projection subspaces by rows; a left projection's (k, cols) moments are
  // replicated and its P (rows, k) is read one parameter row at a time, so split by rows.
  const bool whole = m == FrugalMode::Adam || m == FrugalMode::ActiveBlock;
  std::vector<int64_t> along;
  if (whole)
    for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) along.push_back(d);
  else if (m == FrugalMode::Columns || m == FrugalMode::ProjRight)
    along = {0};
  StateLayout out;
  if (per_row_.at(i)) return per_row_moments(shape, config_.state_bits, along);
  if (whole) {  // m and v shaped like the parameter: as AdamW's (memopt/plan.h moment_specs)
    auto m = moment_specs("exp_avg", *moments, config_.state_bits, false, along);
    auto v = moment_specs("exp_avg_sq", *moments, config_.state_bits, true, along);
    out = {m.front(), v.front()};  // exp_avg, exp_avg_sq, then the scales
    out.insert(out.end(), m.begin() + 1, m.end());
    out.insert(out.end(), v.begin() + 1, v.end());
  } else {
    const StateDType dtype = config_.state_bits == 16 && low_bit_state(*moments)
                                 ? StateDType::BFloat16 : StateDType::Param;
    out = {{"exp_avg", *moments, dtype, false, along}, {"exp_avg_sq", *moments, dtype, false, along}};
  }
  if (const auto sub = j < 0 ? std::nullopt : subspace_shape(j, m))
    out.push_back({"subspace", *sub, subspace_is_index(j) ? StateDType::Int32 : StateDType::Param,
                   false, m == FrugalMode::ProjLeft ? std::vector<int64_t>{0} : std::vector<int64_t>{}});
  return out;
}

std::vector<int64_t> FrugalPlan::row_blocks(int64_t i) const {
  TORCH_CHECK_VALUE(per_row_v(i), "FrugalPlan: tensor ", i, " does not take per-row v");
  return per_row_blocks(shapes_all_.at(i));
}

bool FrugalPlan::subspace_is_index(int64_t j) const {
  return !block_ && is_index_mode(geometry_.at(j).mode);
}

namespace {

// flags[j] = 1 for each projectable tensor j listed.
std::vector<char> projectable_flags(int64_t n, const std::vector<int64_t>& js) {
  std::vector<char> out(n, 0);
  for (int64_t j : js) {
    TORCH_CHECK_INDEX(j >= 0 && j < n, "Frugal: no projectable tensor ", j);
    out[j] = 1;
  }
  return out;
}

}  // namespace

FrugalStateChange FrugalPlan::state_change(FrugalMode m, bool grad, bool holds,
                                           bool redrawn) const {
  if (m == FrugalMode::FreeBlock) return holds ? FrugalStateChange::Drop : FrugalStateChange::None;
  if (!holds)  // a block stays stateless until it has a gradient
    return grad ? FrugalStateChange::Start : FrugalStateChange::None;
  if (redrawn)  // moments of the old subspace: restarted, or carried over unprojected
    return config_.reset_statistics ? FrugalStateChange::Start : FrugalStateChange::Carry;
  return FrugalStateChange::Keep;
}

FrugalStepDecision FrugalPlan::begin_step(
    const std::vector<int64_t>& with_grad, const std::vector<int64_t>& holding,
    const std::function<at::Tensor(int64_t)>& gradient) const {
  const int64_t n = num_projectable();
  const auto grad = projectable_flags(n, with_grad), holds = projectable_flags(n, holding);
  FrugalStepDecision d;
  d.selection = selection_;
  d.selection.held.reset();
  auto& s = d.selection;
  d.subspaces.resize(n);
  // counted in steps with at least one gradient; every update_gap steps a new cycle
  const int64_t cycle = s.t / config_.update_gap;
  if (block_ && cycle != s.block_cycle) {
    s.active = frugal_select_blocks(n, k_blocks_, config_.block_order, s.cursor, s.rng);
    s.block_cycle = cycle;
  }
  // Each tensor redraws at its first gradient of a cycle, in tensor order (upstream's draws).
  for (int64_t j = 0; !block_ && j < n; ++j) {
    if (!grad[j] || s.cycle[j] == cycle) continue;
    s.cycle[j] = cycle;
    const auto& g = geometry_[j];
    if (g.mode == FrugalMode::FreeBlock) continue;
    d.subspaces[j] = is_index_mode(g.mode)  // global shapes: every rank draws alike
        ? frugal_select_indices(g.total, g.k, s.rng)
        : frugal_projection(gradient(j), g.k, g.mode == FrugalMode::ProjRight,
                            config_.selection, s.rng);
  }
  for (int64_t j = 0; j < n; ++j) {
    const FrugalMode m = mode(j, s);
    const bool redrawn = d.subspaces[j].defined();
    const FrugalStateChange change = state_change(m, grad[j], holds[j], redrawn);
    TORCH_CHECK(change != FrugalStateChange::Start || redrawn || !subspace_shape(j, m),
                "Frugal: projectable tensor ", j, " holds no state, yet its subspace of this "
                "cycle was drawn (state loaded without its subspace?)");
    d.modes.push_back(static_cast<int64_t>(m));
    d.changes.push_back(static_cast<int64_t>(change));
    d.repack |= change != FrugalStateChange::Keep && change != FrugalStateChange::None;
  }
  return d;
}

bool FrugalPlan::steady(const std::vector<int64_t>& with_grad,
                        const std::vector<int64_t>& holding, int64_t pending) const {
  const FrugalSelection& s = selection_;
  const int64_t n = num_projectable(), cycle = s.t / config_.update_gap;
  if ((s.t + pending) / config_.update_gap != cycle) return false;  // a cycle may begin
  if (block_ && cycle != s.block_cycle) return false;                // blocks re-selected
  const auto grad = projectable_flags(n, with_grad), holds = projectable_flags(n, holding);
  for (int64_t j = 0; j < n; ++j) {
    if (!block_ && grad[j] && s.cycle[j] != cycle) return false;  // a subspace drawn
    const FrugalStateChange c = state_change(mode(j, s), grad[j], holds[j], false);
    if (c != FrugalStateChange::Keep && c != FrugalStateChange::None) return false;
  }
  return true;
}

void FrugalPlan::advance(int64_t steps) {
  TORCH_CHECK_VALUE(steps >= 0, "Frugal: cannot advance the step count by ", steps);
  selection_.t += steps;
}

void FrugalPlan::commit(const FrugalStepDecision& decision) {
  selection_ = decision.selection;
  selection_.t += 1;
}

}  // namespace memopt
