// String matching on parameter names (internal): the name heuristics of roles.cpp and the
// reference partition of partition.cpp read names the same way.
#pragma once

#include <algorithm>
#include <cctype>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

namespace memopt::names {

inline std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}
inline bool contains_any(const std::string& s, std::initializer_list<const char*> keys) {
  for (const char* k : keys)
    if (s.find(k) != std::string::npos) return true;
  return false;
}
inline bool one_of(const std::string& s, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (s == n) return true;
  return false;
}
// A bias by its leaf name or attribute ("bias", "in_proj_bias", "bias_k"), lower-cased.
inline bool is_bias_leaf(const std::string& leaf) {
  return leaf == "bias" || contains_any(leaf, {"_bias", "bias_"});
}
inline std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  return parts;
}

}  // namespace memopt::names
