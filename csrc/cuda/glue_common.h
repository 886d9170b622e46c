// What the torch glue of every CUDA op shares: the launch dtype of a tensor and the check of a launch's result.
// Compiled only in CUDA builds, with the glue files that include it.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "cuda/tur_loss_cuda.h"  // DType

namespace tur::cuda {

// The kernels' dtype code for `t`; `arg` names the argument in the error (the op's schema checked the rest).
inline DType launch_dtype(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, arg, ": unsupported dtype ", t);
  }
}

// `err`: nullptr or the message a launch_* function returned; `op` and `what` name the op and the launch.
inline void check_launch(const char* err, const char* op, const char* what) {
  TORCH_CHECK(err == nullptr, op, ": CUDA launch of ", what, " failed: ", err);
}

}  // namespace tur::cuda
