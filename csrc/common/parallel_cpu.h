// at::parallel_for whose body runs with the caller's thread-local state.
//
// Worker threads start with default thread-local state, so ATen calls inside a parallel body
// would run above autograd and outside the caller's inference mode / no_grad (an in-place op on
// an inference tensor then raises). The body gets the caller's state: the dispatch keys an op
// kernel runs under (below autograd), grad mode and inference mode.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace lrkernels {

template <typename F>
void parallel_for_caller_state(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    f(b, e);
  });
}

}  // namespace lrkernels
