// batch_norm.cu -- batch normalisation over (N, H, W) per channel, with the
// ReLU that follows it fused in.
//
// Legend: x, y, gy, gx (N, C, H, W), HW = H * W, M = N * HW values per channel;
// per-channel vectors (C,): gamma, beta, mean, var, invstd, scale, shift.
//
// Training forward                                  (kernels 1-3)
//   mean = sum(x) / M,  var = sum((x - mean)^2) / M  (biased),  invstd = 1 / sqrt(var + eps)
//   y = gamma * (x - mean) * invstd + beta = x * scale + shift,  then max(y, 0) if relu
// Inference forward: the same apply with the running statistics (kernels 7, 3).
// Backward                                           (kernels 4-6)
//   g = gy where y > 0 (relu) else gy;  xhat = (x - mean) * invstd
//   gbeta = sum(g),  ggamma = sum(g * xhat)
//   gx = gamma * invstd * (g - gbeta / M - xhat * ggamma / M)      (training)
//   gx = gamma * invstd * g                                        (inference: pass inv_count = 0)
// Running statistics (in kernel 2, when update != 0), PyTorch's convention:
//   r_mean = (1 - momentum) * r_mean + momentum * mean
//   r_var  = (1 - momentum) * r_var  + momentum * var * M / (M - 1)
//
// Statistics are a two-level reduction. Each channel's M values are cut into
// `splits` contiguous chunks; block (s, c) of the reduce kernels handles chunk
// s of channel c. Its threads stride over the chunk (consecutive threads read
// consecutive addresses within an image plane), each keeping running
// statistics, merged across the warp with shuffles and across warps in shared
// memory; the block writes one partial result. A one-thread-per-channel
// finalize kernel merges the `splits` partials. The variance uses Welford's
// update per value and Chan et al.'s pairwise merge (count, mean, M2) -- no
// sum-of-squares cancellation.
// The apply kernels use the same (splits, C) grid, so every block works on one
// channel and keeps its per-channel numbers in registers.
//
// Launchers: minitorch_gx/cuda/norm.py batch_norm_*, called by ops/norm.py; tested
// against ops/norm.py batch_norm_*_reference (tests/ops/test_norm.py).
// Launch shapes:
//   reduce / apply kernels: grid (splits, C), block (BN_THREADS; the reduce kernels
//   accept any multiple of 32 up to it, the others any size)
//   finalize / prepare: grid (ceil(C / BN_THREADS)), block (BN_THREADS)

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef BN_THREADS
#define BN_THREADS 256   // a multiple of 32, at most 1024
#endif
#define NWARPS (BN_THREADS / 32)

// The element range [begin, end) of channel values handled by block (s, c).
__device__ __forceinline__ void chunk_of(int M, int splits, int* begin, int* end) {
    int len = (M + splits - 1) / splits;
    *begin = blockIdx.x * len;
    *end = min(M, *begin + len);
}

// Address of value e (= n * HW + hw) of channel c.
__device__ __forceinline__ int offset_of(int e, int c, int C, int HW) {
    int n = e / HW;
    return (n * C + c) * HW + (e - n * HW);
}

// ---------------------------------------------------------------------------
// Welford statistics: count, mean, M2 = sum of squared deviations.
struct Stats {
    real n, mean, m2;
};

__device__ __forceinline__ void stats_push(Stats& a, real v) {
    a.n += 1;
    real d = v - a.mean;
    a.mean += d / a.n;
    a.m2 += d * (v - a.mean);
}

__device__ __forceinline__ Stats stats_merge(Stats a, Stats b) {
    real n = a.n + b.n;
    if (n == 0) return a;
    real d = b.mean - a.mean, fb = b.n / n;
    Stats r;
    r.n = n;
    r.mean = a.mean + d * fb;
    r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
    return r;
}

// 1. Partial statistics of chunk blockIdx.x of channel blockIdx.y.
//    part[(c * splits + s) * 3 + {0, 1, 2}] = count, mean, M2.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_fwd_reduce(const real* __restrict__ x, real* __restrict__ part, int N, int C, int HW,
              int splits) {
    __shared__ Stats warp_stats[NWARPS];
    if (blockDim.x > BN_THREADS || blockDim.x % 32) __trap();  // warp_stats: BN_THREADS / 32
    const int c = blockIdx.y;
    int begin, end;
    chunk_of(N * HW, splits, &begin, &end);
    Stats st = {0, 0, 0};
    for (int e = begin + threadIdx.x; e < end; e += blockDim.x)
        stats_push(st, x[offset_of(e, c, C, HW)]);
    for (int off = 16; off > 0; off /= 2) {
        Stats o;
        o.n = __shfl_down_sync(0xffffffffu, st.n, off);
        o.mean = __shfl_down_sync(0xffffffffu, st.mean, off);
        o.m2 = __shfl_down_sync(0xffffffffu, st.m2, off);
        st = stats_merge(st, o);
    }
    if (threadIdx.x % 32 == 0) warp_stats[threadIdx.x / 32] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
        Stats total = warp_stats[0];
        for (int w = 1; w < blockDim.x / 32; ++w) total = stats_merge(total, warp_stats[w]);
        real* out = part + (c * splits + blockIdx.x) * 3;
        out[0] = total.n;
        out[1] = total.mean;
        out[2] = total.m2;
    }
}

// 2. Merge the partials of each channel; mean, invstd, the scale/shift that
//    the apply kernel uses and, when update != 0, the running statistics.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_fwd_finalize(const real* __restrict__ part, int splits, int C, real eps,
                const real* __restrict__ gamma, const real* __restrict__ beta,
                real* __restrict__ mean, real* __restrict__ invstd,
                real* __restrict__ scale, real* __restrict__ shift,
                real* __restrict__ running_mean, real* __restrict__ running_var,
                real momentum, int update) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    Stats st = {0, 0, 0};
    for (int s = 0; s < splits; ++s) {
        const real* p = part + (c * splits + s) * 3;
        Stats o = {p[0], p[1], p[2]};
        st = stats_merge(st, o);
    }
    real v = st.m2 / st.n;
    real is = 1 / sqrt(v + eps);
    mean[c] = st.mean;
    invstd[c] = is;
    scale[c] = gamma[c] * is;
    shift[c] = beta[c] - st.mean * gamma[c] * is;
    if (update) {
        running_mean[c] = (1 - momentum) * running_mean[c] + momentum * st.mean;
        running_var[c] = (1 - momentum) * running_var[c] + momentum * st.m2 / (st.n - 1);
    }
}

// 3. y = x * scale[c] + shift[c], then ReLU if relu != 0.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_fwd_apply(const real* __restrict__ x, real* __restrict__ y, const real* __restrict__ scale,
             const real* __restrict__ shift, int N, int C, int HW, int splits, int relu) {
    const int c = blockIdx.y;
    const real a = scale[c], b = shift[c];
    int begin, end;
    chunk_of(N * HW, splits, &begin, &end);
    for (int e = begin + threadIdx.x; e < end; e += blockDim.x) {
        int i = offset_of(e, c, C, HW);
        real v = x[i] * a + b;
        y[i] = relu && v < 0 ? 0 : v;
    }
}

// 4. Partial sums of g and g * (x - mean) over chunk blockIdx.x of channel blockIdx.y.
//    part[(c * splits + s) * 2 + {0, 1}].
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_bwd_reduce(const real* __restrict__ gy, const real* __restrict__ x, const real* __restrict__ y,
              const real* __restrict__ mean, real* __restrict__ part, int N, int C, int HW,
              int splits, int relu) {
    __shared__ real warp_sums[NWARPS][2];
    if (blockDim.x > BN_THREADS || blockDim.x % 32) __trap();  // warp_sums: BN_THREADS / 32
    const int c = blockIdx.y;
    const real mu = mean[c];
    int begin, end;
    chunk_of(N * HW, splits, &begin, &end);
    real sg = 0, sgx = 0;
    for (int e = begin + threadIdx.x; e < end; e += blockDim.x) {
        int i = offset_of(e, c, C, HW);
        real g = relu && !(y[i] > 0) ? 0 : gy[i];
        sg += g;
        sgx += g * (x[i] - mu);
    }
    for (int off = 16; off > 0; off /= 2) {
        sg += __shfl_down_sync(0xffffffffu, sg, off);
        sgx += __shfl_down_sync(0xffffffffu, sgx, off);
    }
    if (threadIdx.x % 32 == 0) {
        warp_sums[threadIdx.x / 32][0] = sg;
        warp_sums[threadIdx.x / 32][1] = sgx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        real a = 0, b = 0;
        for (int w = 0; w < blockDim.x / 32; ++w) {
            a += warp_sums[w][0];
            b += warp_sums[w][1];
        }
        part[(c * splits + blockIdx.x) * 2] = a;
        part[(c * splits + blockIdx.x) * 2 + 1] = b;
    }
}

// 5. gbeta = sum(g), ggamma = invstd * sum(g * (x - mean)).
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_bwd_finalize(const real* __restrict__ part, int splits, int C, const real* __restrict__ invstd,
                real* __restrict__ ggamma, real* __restrict__ gbeta) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    real a = 0, b = 0;
    for (int s = 0; s < splits; ++s) {
        a += part[(c * splits + s) * 2];
        b += part[(c * splits + s) * 2 + 1];
    }
    gbeta[c] = a;
    ggamma[c] = b * invstd[c];
}

// 6. gx = gamma * invstd * (g - gbeta * inv_count - xhat * ggamma * inv_count).
//    inv_count = 1 / M in training; 0 in inference, where the statistics are constants.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_bwd_apply(const real* __restrict__ gy, const real* __restrict__ x, const real* __restrict__ y,
             const real* __restrict__ mean, const real* __restrict__ invstd,
             const real* __restrict__ gamma, const real* __restrict__ ggamma,
             const real* __restrict__ gbeta, real* __restrict__ gx, int N, int C, int HW,
             int splits, real inv_count, int relu) {
    const int c = blockIdx.y;
    const real mu = mean[c], is = invstd[c];
    const real k = gamma[c] * is;                       // gx = k*g + kx*(x - mu) + k0
    const real kx = -k * is * ggamma[c] * inv_count;
    const real k0 = -k * gbeta[c] * inv_count;
    int begin, end;
    chunk_of(N * HW, splits, &begin, &end);
    for (int e = begin + threadIdx.x; e < end; e += blockDim.x) {
        int i = offset_of(e, c, C, HW);
        real g = relu && !(y[i] > 0) ? 0 : gy[i];
        gx[i] = k * g + kx * (x[i] - mu) + k0;
    }
}

// 7. Inference: invstd, scale and shift from the running statistics.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_infer_prepare(const real* __restrict__ gamma, const real* __restrict__ beta,
                 const real* __restrict__ running_mean, const real* __restrict__ running_var,
                 real eps, int C, real* __restrict__ invstd, real* __restrict__ scale,
                 real* __restrict__ shift) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    real is = 1 / sqrt(running_var[c] + eps);
    invstd[c] = is;
    scale[c] = gamma[c] * is;
    shift[c] = beta[c] - running_mean[c] * gamma[c] * is;
}
