// kernels/qmap.h: the code of an 8-bit map (ops.h, mt_qmap) nearest to a
// value, one definition for the CPU reference and the CUDA kernels.
#ifndef MT_QMAP_H
#define MT_QMAP_H

#ifdef __CUDACC__
#define MT_QMAP_FN static inline __host__ __device__
#else
#define MT_QMAP_FN static inline
#endif

// map: 256 ascending values; ties go to the lower code.
MT_QMAP_FN unsigned char mt_qmap_nearest(const float *map, float x) {
    if (x <= map[0]) return 0;
    int lo = 0, hi = 255;  // the last entry <= x, by bisection
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (map[mid] <= x)
            lo = mid;
        else
            hi = mid - 1;
    }
    if (lo < 255 && map[lo + 1] - x < x - map[lo]) lo++;
    return (unsigned char)lo;
}

#endif
