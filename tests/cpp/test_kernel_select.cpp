// The SIMT / tensor-core choice (include/lrkernels/common/kernel_select.h): a build whose
// loaded image is older than sm_80 (e.g. "7.5+PTX" JIT-compiled on an sm_90 GPU) never takes
// the tensor-core kernels, whatever the setting and the shape.
#include "check.h"
#include "lrkernels/common/kernel_select.h"

using namespace lrkernels;

int main() {
  using M = CudaKernels;
  using P = TensorCorePath;
  // auto: tensor cores only with 16-bit operands, an sm_80+ image and a shape that pays
  CHECK(choose_tensor_cores(M::kAuto, true, 800, true) == P::kTensorCore);
  CHECK(choose_tensor_cores(M::kAuto, true, 900, true) == P::kTensorCore);
  CHECK(choose_tensor_cores(M::kAuto, true, 900, false) == P::kSimt);
  CHECK(choose_tensor_cores(M::kAuto, false, 900, true) == P::kSimt);  // fp32 operand(s)
  // images below sm_80 (PTX of compute_75 JIT-compiled on an sm_90 GPU), or none: SIMT
  CHECK(choose_tensor_cores(M::kAuto, true, 750, true) == P::kSimt);
  CHECK(choose_tensor_cores(M::kAuto, true, 700, true) == P::kSimt);
  CHECK(choose_tensor_cores(M::kAuto, true, 0, true) == P::kSimt);
  CHECK(choose_tensor_cores(M::kAuto, true, -1, true) == P::kSimt);
  // simt: never
  CHECK(choose_tensor_cores(M::kSimt, true, 900, true) == P::kSimt);
  CHECK(choose_tensor_cores(M::kSimt, true, 0, true) == P::kSimt);
  // tensor_core: at every shape when there is code; without code the caller raises
  CHECK(choose_tensor_cores(M::kTensorCore, true, 800, false) == P::kTensorCore);
  CHECK(choose_tensor_cores(M::kTensorCore, true, 750, true) == P::kUnavailable);
  CHECK(choose_tensor_cores(M::kTensorCore, true, 0, false) == P::kUnavailable);
  CHECK(choose_tensor_cores(M::kTensorCore, false, 900, true) == P::kSimt);  // fp32: no tensor-core kernel
  static_assert(choose_tensor_cores(M::kAuto, true, 790, true) == P::kSimt, "usable in constant expressions");

  CHECK(env_flag_on("1"));
  CHECK(env_flag_on("1 "));
  CHECK(!env_flag_on("0"));
  CHECK(!env_flag_on(""));
  CHECK(!env_flag_on(nullptr));
  return g_failures;
}
