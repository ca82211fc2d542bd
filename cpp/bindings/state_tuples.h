// A plan's StateLayout as Python tuples (key, shape, StateDType, follows_param, sharded_along,
// fill): the one conversion every plan binding uses.
#pragma once

#include <nanobind/nanobind.h>

#include <vector>

#include "memopt/plan.h"

inline std::vector<nanobind::tuple> state_tuples(const memopt::StateLayout& layout) {
  std::vector<nanobind::tuple> out;
  for (const auto& s : layout)
    out.push_back(nanobind::make_tuple(s.key, s.shape, s.dtype, s.follows_param, s.sharded_along,
                                       s.fill));
  return out;
}
