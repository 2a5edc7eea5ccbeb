// dropout_mask on CPU: the mask the fused ops apply, materialised (tests, debugging).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dropout.h"
#include "common/dropout_cpu.h"

namespace lrkernels {

at::Tensor dropout_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double p,
                            at::ScalarType dtype) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "lrkernels.dropout_mask: rows and cols must be >= 0, got (", rows,
                    ", ", cols, ")");
  auto out = at::empty({rows, cols}, seed.options().dtype(dtype));
  const DropoutParams d = make_dropout_params(p, seed, seed, "dropout_mask");
  if (d.threshold == 0) return out.fill_(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dropout_mask_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t keep = static_cast<scalar_t>(d.keep_scale);
    for_each_dropout_group(rows, cols, d, [&](int64_t r, int64_t g, uint32_t bits) {
      for (int e = 0; e < 8 && g * 8 + e < cols; ++e)
        o[r * cols + g * 8 + e] = ((bits >> e) & 1u) ? keep : scalar_t(0);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) { m.impl("dropout_mask", &dropout_mask_cpu); }

}  // namespace lrkernels
