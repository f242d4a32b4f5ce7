// kernels/nf4.h: 4-bit NormalFloat (NF4) storage of frozen weights, as
// bitsandbytes defines it for QLoRA (Dettmers et al., 2023): values in blocks
// of 64 are divided by the block's absolute maximum and mapped to the nearest
// of 16 fixed code values (ties go to the lower one), two codes per byte with
// the first in the high nibble. Double quantization stores the absmax values
// themselves in 8 bits: their mean (offset) is subtracted, and groups of 256
// are quantized with bitsandbytes' signed dynamic 8-bit map and one fp32
// scale per group. That is 0.5 + 1/64 + 4/16384 bytes per value.
//
// The CPU reference (`_ref`) defines the format; the GPU computes the absmax
// values and the 4-bit codes bit for bit the same, and the small double
// quantization runs on the host for both backends.
#ifndef MT_NF4_H
#define MT_NF4_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"
#include "kernels/device.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_NF4_BLOCK 64   // values per absmax
#define MT_NF4_GROUP 256  // absmax values per second-level scale

// One tensor of n values in NF4. The arrays live where the backend computes
// (host memory for the CPU, device memory for the GPU).
typedef struct {
    size_t n;
    uint8_t *codes;     // ((n + 1) / 2) packed 4-bit codes
    uint8_t *absmax_q;  // (blocks) 8-bit codes of absmax - offset
    float *absmax2;     // (groups) absmax of each group of 256 (absmax - offset)
    float offset;       // mean of the fp32 absmax values
} mt_nf4;

// The 16 NF4 code values, ascending (bitsandbytes' table).
extern const float mt_nf4_code[16];
// bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)),
// 256 values ascending, computed in fp32 as torch does.
void mt_nf4_dynamic_map(float code[256]);

size_t mt_nf4_blocks(size_t n);  // ceil(n / 64)
size_t mt_nf4_groups(size_t n);  // ceil(blocks / 256)
// Bytes of the arrays for n values (each array 256-byte aligned), and where
// each starts inside one allocation of that size.
size_t mt_nf4_storage_bytes(size_t n);
void mt_nf4_bind(mt_nf4 *q, void *storage, size_t n);

// ---- CPU reference
// absmax[b] = max |x| over block b (at least 1e-38, as bitsandbytes clamps).
void mt_nf4_absmax_ref(float *absmax, const float *x, size_t n);
// Packed codes of x given the exact fp32 absmax of each block.
void mt_nf4_codes_ref(uint8_t *codes, const float *x, size_t n, const float *absmax);
// Double quantization of `blocks` absmax values (host memory, both backends).
void mt_nf4_quantize_absmax(uint8_t *absmax_q, float *absmax2, float *offset, const float *absmax, size_t blocks);
// The dequantized absmax of block b.
float mt_nf4_block_scale(const mt_nf4 *q, const float dynamic_map[256], size_t b);
// out[i] = code[q_i] * dequantized absmax, fp32.
void mt_nf4_dequantize_ref(float *out, const mt_nf4 *q);

// ---- on the backend
// Quantizes n fp32 host values into q (bound to storage on the backend).
// On the GPU the values pass through a small staging buffer.
mt_err mt_nf4_quantize(const mt_backend *be, mt_nf4 *q, const float *host_values);
// out (activation type: fp32 on the CPU, bf16 on the GPU) <- dequantized q.
void mt_nf4_dequantize(const mt_backend *be, void *out, const mt_nf4 *q);

#ifdef __cplusplus
}
#endif
#endif
