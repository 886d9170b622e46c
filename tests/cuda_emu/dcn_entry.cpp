// C entry points for ctypes (tests/test_deform_conv_emu.py): fill tur::cuda::DcnLaunch (csrc/cuda/
// deform_conv2d_cuda.h) for one image and run one of the DCNv2 kernels on the emulated device (cuda_emu.h), with
// the emulator configured for `sms` SMs and scheduling seed `seed`.
#include <cstdint>

#include "cuda/deform_conv2d_cuda.h"
#include "cuda_emu.h"

namespace {

// dims: C, H, W, kh, kw, offset_groups, sh, sw, ph, pw, dh, dw, Ho, Wo
tur::cuda::DcnLaunch make(int dtype, const void* input, const void* offset, const void* mask, const int64_t* d) {
  tur::cuda::DcnLaunch a;
  a.dtype = static_cast<tur::cuda::DType>(dtype);
  a.input = input;
  a.offset = offset;
  a.mask = mask;
  a.C = d[0];
  a.H = d[1];
  a.W = d[2];
  a.kh = d[3];
  a.kw = d[4];
  a.offset_groups = d[5];
  a.sh = d[6];
  a.sw = d[7];
  a.ph = d[8];
  a.pw = d[9];
  a.dh = d[10];
  a.dw = d[11];
  a.Ho = d[12];
  a.Wo = d[13];
  return a;
}

}  // namespace

extern "C" {

const char* emu_dcn_im2col(int dtype, const void* input, const void* offset, const void* mask, const int64_t* dims,
                           void* cols, int sms, unsigned seed) {
  emu::configure(sms, seed);
  return tur::cuda::launch_dcn_im2col(make(dtype, input, offset, mask, dims), cols, nullptr);
}

const char* emu_dcn_col2im(int dtype, const void* input, const void* offset, const void* mask, const int64_t* dims,
                           const void* grad_cols, void* grad_input, int sms, unsigned seed) {
  emu::configure(sms, seed);
  return tur::cuda::launch_dcn_col2im(make(dtype, input, offset, mask, dims), grad_cols, grad_input, nullptr);
}

const char* emu_dcn_offset_mask_grad(int dtype, const void* input, const void* offset, const void* mask,
                                     const int64_t* dims, const void* grad_cols, void* grad_offset, void* grad_mask,
                                     int sms, unsigned seed) {
  emu::configure(sms, seed);
  return tur::cuda::launch_dcn_offset_mask_grad(make(dtype, input, offset, mask, dims), grad_cols, grad_offset,
                                                grad_mask, nullptr);
}

uint64_t emu_dcn_launches() { return emu::launches(); }
}
