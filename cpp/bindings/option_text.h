// A string option read from Python: its text, or the repr of a non-string, so that the C++ check
// of the option rejects it by name (ValueError) instead of nanobind refusing the call (TypeError).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

inline std::string option_text(nanobind::handle value) {
  return nanobind::isinstance<nanobind::str>(value) ? nanobind::cast<std::string>(value)
                                                    : std::string(nanobind::repr(value).c_str());
}
