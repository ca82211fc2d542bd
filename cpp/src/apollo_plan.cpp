// memopt::ApolloPlan (apollo_plan.h): APOLLO's grouping rule, settings checks, seeds and layouts.
#include "memopt/apollo_plan.h"
#include "memopt/partition.h"

#include <functional>

#include <numeric>

#include <c10/util/Exception.h>

#include <algorithm>

#include "memopt/adamw.h"

namespace memopt {

std::vector<int64_t> apollo_ranks(const std::vector<ApolloCandidate>& tensors, int64_t rank) {
  TORCH_CHECK_VALUE(rank >= 0, "Apollo: rank must be >= 0 (0: plain AdamW), got ", rank);
  std::vector<int64_t> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    const bool matrix = t.shape.size() == 2;
    const bool chosen = rank > 0 && matrix && (!t.role || role_traits(*t.role).hidden_matrix);
    // max(1, ...): an empty matrix keeps rank 1 so that its Projector refuses it by name
    out.push_back(chosen ? std::max<int64_t>(1, std::min({rank, t.shape[0], t.shape[1]})) : 0);
  }
  return out;
}

std::vector<std::pair<int64_t, std::vector<int64_t>>> apollo_rank_groups(
    const std::vector<int64_t>& ranks) {
  std::vector<std::pair<int64_t, std::vector<int64_t>>> groups;
  std::vector<int64_t> adamw;
  for (size_t i = 0; i < ranks.size(); ++i) {
    const auto pos = static_cast<int64_t>(i);
    if (ranks[i] == 0) {
      adamw.push_back(pos);
      continue;
    }
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return g.first == ranks[i]; });
    if (it == groups.end()) it = groups.insert(groups.end(), {ranks[i], {}});
    it->second.push_back(pos);
  }
  if (!adamw.empty()) groups.emplace_back(0, std::move(adamw));
  return groups;
}

namespace {
ApolloConfig config_of(const ApolloSettings& s) {
  return make_apollo_config(*s.rank, s.proj, s.proj_type, s.scale_type, s.update_proj_gap,
                            s.scale, s.norm_growth_limit, s.scale_front);
}
}  // namespace

void ApolloPlan::add_group(const std::vector<std::vector<int64_t>>& shapes,
                           const ApolloSettings& settings, const std::vector<bool>& split) {
  TORCH_CHECK_VALUE(split.empty() || split.size() == shapes.size(), "Apollo: ", split.size(),
                    " split flags for ", shapes.size(), " tensors");
  // every group has one (torch saves it with the group), used wherever the group takes AdamW
  parse_adamw_rule(settings.adamw_rule);
  check_state_bits(settings.state_bits);
  TORCH_CHECK_VALUE(!settings.per_row_v || !settings.rank, "Apollo: embeddings='adam_mini' "
                    "(per-row v) applies to the groups that take AdamW, not to a projected group");
  std::vector<Planned> added;
  added.reserve(shapes.size());
  if (settings.rank) {
    config_of(settings);  // raises, naming the key
    TORCH_CHECK_VALUE(settings.proj != "svd" || settings.store_projection,
                      "proj='svd' needs store_projection=True: an SVD basis cannot be "
                      "regenerated from a seed");
  }
  for (size_t k = 0; k < shapes.size(); ++k) {
    Planned t{groups_.size(), shapes[k], std::nullopt};
    if (settings.rank) {
      t.projector.emplace(settings.proj, settings.proj_type, *settings.rank, shapes[k]);
      TORCH_CHECK_VALUE(
          settings.proj != "svd" || split.empty() || !split[k],
          "APOLLO with proj='svd' cannot step weights sharded over ranks (FSDP2): an SVD "
          "refresh needs the whole gradient on one rank; use proj='random' (the seeded "
          "projection is the same on every rank)");
    }
    added.push_back(std::move(t));
  }
  // Nothing is kept before everything is checked: a refused group leaves the plan as it was.
  groups_.push_back(settings);
  tensors_.insert(tensors_.end(), std::make_move_iterator(added.begin()),
                  std::make_move_iterator(added.end()));
}

std::vector<int64_t> ApolloPlan::row_blocks(int64_t i) const {
  const Planned& t = tensor(i);
  TORCH_CHECK_VALUE(!t.projector && settings(i).per_row_v, "ApolloPlan: tensor ", i,
                    " does not take per-row v");
  return per_row_blocks(t.shape);
}

const ApolloPlan::Planned& ApolloPlan::tensor(int64_t i) const {
  TORCH_CHECK_VALUE(i >= 0 && i < size(), "ApolloPlan: no tensor ", i, " (", size(),
                    " planned)");
  return tensors_[static_cast<size_t>(i)];
}

int64_t ApolloPlan::seed(int64_t i) const {
  tensor(i);  // range check
  return i + 1;
}

const Projector& ApolloPlan::projector(int64_t i) const {
  const auto& t = tensor(i);
  TORCH_CHECK_VALUE(t.projector, "ApolloPlan: tensor ", i, " takes AdamW, it has no projector");
  return *t.projector;
}

ApolloConfig ApolloPlan::config(int64_t i) const {
  projector(i);  // projected tensors only
  return config_of(settings(i));
}

int64_t ApolloPlan::scale_factors(int64_t i) const {
  if (!projected(i)) return 0;
  return settings(i).scale_type == "channel" ? projector(i).channels() : 1;
}

int64_t ApolloPlan::workspace_bytes(int64_t i, at::ScalarType dtype) const {
  if (!projected(i)) return 0;
  return apollo_workspace_bytes(tensor(i).shape, dtype, config(i),
                                settings(i).store_projection);
}

StateLayout ApolloPlan::state(int64_t i) const {
  const auto& t = tensor(i);
  if (!t.projector) {  // AdamW: elementwise with the parameter, sharded with it along any dim
    std::vector<int64_t> all(t.shape.size());
    for (size_t d = 0; d < all.size(); ++d) all[d] = static_cast<int64_t>(d);
    const ApolloSettings& s = settings(i);
    if (s.per_row_v) return per_row_moments(t.shape, s.state_bits, all);
    StateLayout out = moment_specs("exp_avg", t.shape, s.state_bits, false, all);
    StateLayout v = moment_specs("exp_avg_sq", t.shape, s.state_bits, true, all);
    out.insert(out.begin() + 1, v.front());  // exp_avg, exp_avg_sq, then the scales
    out.insert(out.end(), v.begin() + 1, v.end());
    return out;
  }
  const Projector& proj = *t.projector;
  const ApolloSettings& s = settings(i);
  // R's channels are the weight's rows (Right) or columns (Left): a shard along that dim holds
  // its own channels' moments; a shard along the contracted dim needs them whole (replicated).
  const std::vector<int64_t> channels_dim{proj.side() == ProjSide::Right ? 0 : 1};
  // R's moments only share a shape with the parameter by chance: contiguous, not its layout.
  StateLayout out{{"exp_avg", proj.low_rank_shape(), StateDType::Param, false, channels_dim, 0.0},
                  {"exp_avg_sq", proj.low_rank_shape(), StateDType::Param, false, channels_dim,
                   0.0}};
  // P, seed and limiter norm are the whole weight's: every rank updates them alike.
  if (s.store_projection)
    out.push_back({"proj", proj.proj_shape(), StateDType::Param, false, {}, 0.0});
  if (proj.kind() == Projector::Kind::Random)
    out.push_back({"seed", {}, StateDType::Int64, false, {}, static_cast<double>(seed(i))});
  // -1: no norm yet (the limiter starts from the first update's norm)
  out.push_back({"limiter_norm", {}, StateDType::Scalar, false, {}, -1.0});
  return out;
}

}  // namespace memopt
