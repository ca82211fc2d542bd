// One schema per op, written once beside its kernels: define_op registers the op and its
// validator, torch.ops.memopt.check_<name>: the same arguments (none written), and a kernel for
// every device that runs everything the op checks before it writes. The front ends call the
// validator of every (group, device) call before they run any op, so that bad input anywhere
// changes nothing; no binding code repeats the signature.
#pragma once

#include <torch/library.h>

#include <string>

namespace memopt {

// "check_" + the op's name, with the op's arguments and no alias annotations ("(a!)").
std::string validator_schema(const std::string& op_schema);

template <typename Fn>
void define_op(torch::Library& m, const std::string& schema, Fn* validator) {
  m.def(schema.c_str());
  m.def(validator_schema(schema).c_str(),
        torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, validator));
}

}  // namespace memopt
