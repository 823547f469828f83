// Argument checks for the compiled ops. The Python wrappers validate first and
// give the friendliest messages; these keep direct torch.ops.tcm.* calls from
// ever reaching a kernel with input it cannot handle. Messages follow
// "<op>: <argument> must be <expected>, got <received>".
#pragma once

#include <c10/util/Exception.h>

#define TCM_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)
#define TCM_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, op, ": ", __VA_ARGS__)
