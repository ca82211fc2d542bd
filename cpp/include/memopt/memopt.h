// memopt_core's C++ API in one include, for LibTorch trainers: the optimizers as
// torch::optim::Optimizer classes (AdamW, AdamMini, SlimAdam, Apollo, ApolloMini, Frugal) and the
// fused update functions, block partitioner and projections they are built on. The per-part
// headers stay available for code that wants less.
#pragma once

#include "memopt/adam_mini.h"
#include "memopt/adamw.h"
#include "memopt/apollo.h"
#include "memopt/apollo_plan.h"
#include "memopt/arena.h"
#include "memopt/common.h"
#include "memopt/frugal.h"
#include "memopt/frugal_optimizer.h"
#include "memopt/frugal_plan.h"
#include "memopt/module_roles.h"
#include "memopt/nonfinite.h"
#include "memopt/optimizers.h"
#include "memopt/partition.h"
#include "memopt/projection.h"
#include "memopt/slim_adam.h"
