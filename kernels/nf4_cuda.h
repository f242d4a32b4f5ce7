// kernels/nf4_cuda.h: the CUDA side of NF4 (nf4.h); called through nf4.c.
#ifndef MT_NF4_CUDA_H
#define MT_NF4_CUDA_H

#include <stddef.h>

#include "kernels/common.h"
#include "kernels/nf4.h"

#ifdef __cplusplus
extern "C" {
#endif

// Packed codes (device) of n fp32 host values, which pass through a small
// device staging buffer; the exact fp32 absmax of each block comes back into
// absmax (host, ceil(n / 64) floats) for the double quantization.
mt_err mt_nf4_codes_cuda(uint8_t *codes, float *absmax, const float *host_values, size_t n);
// Same, for n fp32 values already on the device (for tests).
void mt_nf4_codes_device_cuda(uint8_t *codes, float *absmax, const float *values, size_t n);
// out (bf16, device) <- dequantized q (device arrays), on the backend's stream.
void mt_nf4_dequantize_cuda(const mt_backend *be, void *out, const mt_nf4 *q);

#ifdef __cplusplus
}
#endif
#endif
