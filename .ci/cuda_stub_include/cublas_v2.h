// Compile-check stub (make cuda-check only; never used by a real build): this machine's CUDA toolkit lacks the
// CUDA math-library headers that ATen's CUDA headers include. It declares only the types those headers name, so
// csrc/cuda/*.cpp can be compiled against torch's real CUDA headers. Searched after every real include directory.
#pragma once
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
