// linear.cu -- the bias of the classifier (minitorch_gx/ops/basic.py Linear),
// forward and backward; the GEMMs around it are cuBLAS's.
//
// Legend: y, gy (N, K) row-major; b, gb (K,).
//   add_bias:    y[i, k] += b[k]                          (in place, after y = x W^T)
//   sum_columns: out[k] = scale * sum_i a[i, k]            (gb with scale 1)
// Each column is summed by one thread, rows in order: no atomics, and the
// result never depends on scheduling. Neighbouring threads read neighbouring
// columns (coalesced).
//
// Threads: add_bias, one element per thread: blockIdx.y the row, x the
// column (no division); sum_columns, one column per thread. Launch: add_bias
// grid (ceil(K / EW_THREADS), N); sum_columns grid (ceil(K / EW_THREADS));
// block (EW_THREADS, or fewer).
// Launchers: minitorch_gx/cuda/linear.py add_bias / sum_columns, called by
// ops/basic.py Linear; tested against NumPy (tests/ops/test_basic.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef EW_THREADS
#define EW_THREADS 256
#endif

extern "C" __global__ void __launch_bounds__(EW_THREADS)
add_bias(real* __restrict__ y, const real* __restrict__ b, int N, int K) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < K) y[(long long)blockIdx.y * K + k] += b[k];
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
sum_columns(const real* __restrict__ a, real* __restrict__ out, int N, int K, real scale) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    real s = 0;
    for (int i = 0; i < N; ++i) s += a[(long long)i * K + k];
    out[k] = s * scale;
}
