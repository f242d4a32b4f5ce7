// kernels/qmap.h: the code of an 8-bit map (ops.h, mt_qmap) nearest to a
// value, one definition for the CPU reference and the CUDA kernels.
#ifndef MT_QMAP_H
#define MT_QMAP_H

#ifdef __CUDACC__
#define MT_QMAP_FN static inline __host__ __device__
#else
#define MT_QMAP_FN static inline
#endif

// map: 256 ascending values. The last code whose value is at most x, by
// bisection (0 when none is, or x is NaN).
MT_QMAP_FN unsigned char mt_qmap_floor(const float *map, float x) {
    if (x <= map[0]) return 0;
    int lo = 0, hi = 255;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (map[mid] <= x)
            lo = mid;
        else
            hi = mid - 1;
    }
    return (unsigned char)lo;
}

// Of code lo (the floor above) and the next one, the nearer to x; ties go to
// the lower code.
MT_QMAP_FN unsigned char mt_qmap_round(const float *map, float x, int lo) {
    int next = lo < 255 ? lo + 1 : 255;  // (no branch on which is nearer: that is a coin toss for moments)
    return (unsigned char)(lo + ((lo < 255) & (map[next] - x < x - map[lo])));
}

// The code nearest to x; ties go to the lower code.
MT_QMAP_FN unsigned char mt_qmap_nearest(const float *map, float x) {
    return x <= map[0] ? 0 : mt_qmap_round(map, x, mt_qmap_floor(map, x));
}

#endif
