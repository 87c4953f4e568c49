// avg_pool.cu -- the global average pool before ResNeXt's classifier, and its
// backward.
//
// Legend: x (N, C, H, W) whose planes (H*W values each, HW in all) lie in
// NCHW order (plane n * C + c) or CNHW order (plane c * N + n, the GPU path's
// layout: minitorch_gx/cuda/device.py); y (N, C), row-major whatever x's layout,
// since the classifier reads it as a matrix.
//   forward:  y[n, c] = inv * sum_i x[plane(n, c), i],   inv = 1 / HW
//   backward: gx[plane(n, c), i] = gy[n, c] * inv         (gx in x's layout)
// The sum runs in a fixed order (lane-strided partial sums, then a fixed
// shuffle tree), so the result never depends on scheduling.
//
// Threads: one warp per plane, its lanes along the plane; a grid-stride loop
// over planes. (n, c) is found with one division per plane. Launch: grid
// (min(ceil(N * C / warps per block), 65535)), block (POOL_THREADS, a multiple of 32).
// Launchers: minitorch_gx/cuda/pool.py global_avg_pool_forward / _backward, called by
// ops/pool.py AdaptiveAvgPool2d for an output of 1 x 1; tested against
// ops/pool.py's reference (tests/ops/test_pool.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef POOL_THREADS
#define POOL_THREADS 256
#endif

// Row-major index n * C + c of plane `plane` in y.
__device__ __forceinline__ int out_index(int plane, int N, int C, int cnhw) {
    if (cnhw) {
        const int c = plane / N;
        return (plane - c * N) * C + c;
    }
    return plane;
}

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
global_avg_pool_fwd(const real* __restrict__ x, real* __restrict__ y, int N, int C, int HW,
                    int cnhw, real inv) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int plane = blockIdx.x * warps + threadIdx.x / 32; plane < N * C;
         plane += gridDim.x * warps) {
        const real* src = x + (long long)plane * HW;
        real s = 0;
        for (int i = lane; i < HW; i += 32) s += src[i];
        for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) y[out_index(plane, N, C, cnhw)] = s * inv;
    }
}

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
global_avg_pool_bwd(const real* __restrict__ gy, real* __restrict__ gx, int N, int C, int HW,
                    int cnhw, real inv) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int plane = blockIdx.x * warps + threadIdx.x / 32; plane < N * C;
         plane += gridDim.x * warps) {
        const real g = gy[out_index(plane, N, C, cnhw)] * inv;
        real* dst = gx + (long long)plane * HW;
        for (int i = lane; i < HW; i += 32) dst[i] = g;
    }
}
