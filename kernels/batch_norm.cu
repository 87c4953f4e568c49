// batch_norm.cu -- batch normalisation over (N, H, W) per channel, with the
// ReLU that follows it fused in.
//
// Legend: x, y, gy, gx (N, C, H, W), HW = H * W, M = N * HW values per channel;
// per-channel vectors (C,): gamma, beta, mean, invstd, and k = gamma * invstd.
//
// Training forward: 2 launches (kernels 1, 2), 3 passes over the tensor (x read
// twice, y written once)
//   mean = sum(x) / M,  var = sum((x - mean)^2) / M  (biased),  invstd = 1 / sqrt(var + eps)
//   y = (x - mean) * k + beta  (one fused multiply-add),  then max(y, 0) if relu
// Inference forward: the same apply with running_mean and the invstd of
// running_var (kernels 5, 2).
// Backward: 2 launches (kernels 3, 4), 5 passes (gy and x read twice, gx written)
//   g = gy where y > 0 (relu) else gy;  xhat = (x - mean) * invstd
//   gbeta = sum(g),  ggamma = sum(g * xhat)
//   gx = k * (g - gbeta / M - xhat * ggamma / M)      (training)
//   gx = k * g                                        (inference: pass inv_count = 0;
//                                                      kernel 5 first, then 3, 4)
// Running statistics (kernel 1, when update != 0), PyTorch's convention:
//   r_mean = (1 - momentum) * r_mean + momentum * mean
//   r_var  = (1 - momentum) * r_var  + momentum * var * M / (M - 1)
//
// The ReLU mask without y: the backward kernels recompute y from x, mean,
// invstd, gamma and beta with the forward's own arithmetic (`affine`: the same
// subtraction x - mean, k = gamma * invstd one rounded product, one fma), so
// their y > 0 is bit for bit the mask the forward applied, and y is not read.
//
// Work: grid (splits, C). Block (s, c) handles chunk s of channel c: its M
// values in (n, hw) order cut into `splits` contiguous chunks. The threads
// stride over the chunk, consecutive threads at consecutive addresses within an
// image plane. A thread's position moves on as (hw, address) by additions only
// (`Walk`: its few divisions are done when the thread starts). All four big
// kernels share the grid, so each block works on one channel and keeps that
// channel's numbers in registers.
//
// Statistics without a divide per value: every thread sums the shifts of its
// values from its own first value q, s1 = sum(x - q), s2 = sum((x - q)^2) (a
// pair per vector lane), and turns them once into (count, mean - p, M2) =
// (n, q - p + s1 / n, s2 - s1^2 / n), p the channel's first value; threads,
// warps and blocks merge those by Chan et al.'s pairwise formula, and the
// finalize adds p back. q is one of the thread's own values, so s2 - s1^2 / n
// cancels little, and the merged means are shifts of the size of the spread,
// not of the mean, so they keep their digits even when the mean dwarfs the
// spread: at mean 1000, std 0.01 in float32, E[x^2] - E[x]^2 keeps no digit
// of the variance, per-value Welford updates (means near 1000, to float32's
// 6e-5) leave a relative error near 1e-3, this about 3e-7 (tests/ops/test_norm.py
// checks 2e-6, also with a pivot p 50 standard deviations out).
//
// Finalize in the last block (no third launch): each block writes its partial
// to `part`, fences, and counts itself in count[c] (atomicAdd). The block that
// brings count[c] to `splits` is the last of channel c: it reads all partials
// back (atomically: other SMs wrote them, its own L1 may be stale), merges them
// in the fixed order s = 0, 1, ... (thread t takes t, t + blockDim.x, ..., then
// the same block merge), so the result has the same bits whichever block came
// last, then writes mean, invstd and the running statistics (kernel 1) or
// ggamma and gbeta (kernel 3), and resets count[c] to 0 for the next launch.
// `count` (C,) is the launcher's, zeroed once per device and never again.
//
// Vectors: when HW is a multiple of 16 / sizeof(real) and the big arrays are
// 16-byte aligned (the launcher checks both and passes vec = 1; the kernels
// rely on it), values move 16 bytes at a time (`Vec`: 4 floats or 2 doubles,
// one ld/st.global.v4.f32 or .v2.f64), never straddling two planes; otherwise
// one at a time (`Scalar`).
//
// Launchers: minitorch_gx/cuda/norm.py batch_norm_*, called by ops/norm.py; tested
// against ops/norm.py batch_norm_*_reference (tests/ops/test_norm.py).
// Launch shapes:
//   kernels 1-4: grid (splits, C), block (BN_THREADS; the reduce kernels 1 and 3
//   accept any multiple of 32 up to it, 2 and 4 any size)
//   kernel 5: grid (ceil(C / BN_THREADS)), block (BN_THREADS)

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef BN_THREADS
#define BN_THREADS 256   // a multiple of 32, at most 1024
#endif
#define NWARPS (BN_THREADS / 32)

// ---------------------------------------------------------------------------
// Memory: an item is one value (Scalar) or 16 bytes of them (Vec).
struct Scalar {
    real v[1];
};
struct Vec {
    alignas(16) real v[16 / sizeof(real)];
};

template <class P>
__device__ __forceinline__ P load(const real* a, unsigned i) {
    return reinterpret_cast<const P*>(a)[i];
}

template <class P>
__device__ __forceinline__ void store(real* a, unsigned i, const P& v) {
    reinterpret_cast<P*>(a)[i] = v;
}

// Where one thread is in its block's chunk: item e = n * HWi + hw of the
// channel's (n, hw) sequence, at address i = (n * C + c) * HWi + hw (in items);
// each step moves blockDim.x items on, and hw wraps into the next image.
struct Walk {
    unsigned e, end;        // the item, and the chunk's end
    unsigned hw, HWi;       // e % HWi; items per plane
    unsigned i;             // the item's address
    unsigned step, hw_step, i_step, i_wrap;
};

template <class P>
__device__ __forceinline__ Walk walk_start(int N, int C, int HW, int splits) {
    Walk w;
    w.HWi = HW / (sizeof(P) / sizeof(real));
    unsigned total = N * w.HWi, len = (total + splits - 1) / splits;
    w.e = blockIdx.x * len + threadIdx.x;
    w.end = min(total, blockIdx.x * len + len);
    unsigned n = w.e / w.HWi;                    // the divisions, once per thread
    w.hw = w.e - n * w.HWi;
    w.i = (n * C + blockIdx.y) * w.HWi + w.hw;
    w.step = blockDim.x;
    unsigned n_step = w.step / w.HWi;
    w.hw_step = w.step - n_step * w.HWi;         // step = n_step planes + hw_step items
    w.i_step = n_step * C * w.HWi + w.hw_step;
    w.i_wrap = (C - 1) * w.HWi;                  // from the end of a plane to the next image's
    return w;
}

__device__ __forceinline__ void walk_next(Walk& w) {
    w.e += w.step;
    w.hw += w.hw_step;
    w.i += w.i_step;
    if (w.hw >= w.HWi) {
        w.hw -= w.HWi;
        w.i += w.i_wrap;
    }
}

// ---------------------------------------------------------------------------
// y before the ReLU from d = x - mean: the one formula of the forward apply and
// of both backward kernels' masks.
__device__ __forceinline__ real affine(real d, real k, real b) {
    return fma(d, k, b);
}

// The gradient that reaches the affine output: the ReLU passed it where y > 0.
__device__ __forceinline__ real masked(real g, real d, real k, real b, int relu) {
    return relu && !(affine(d, k, b) > 0) ? 0 : g;
}

// ---------------------------------------------------------------------------
// Statistics: count, mean, M2 = sum of squared deviations.
struct Stats {
    real n, mean, m2;
};

// Chan et al.'s pairwise merge (one divide per merge, not per value).
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

// This thread's values of the chunk as Stats whose mean is a shift from the
// channel's pivot p. The sums s1, s2 (a pair per lane of an item) shift by
// the thread's own first value q, so they cancel little even if p is far out.
template <class P>
__device__ Stats thread_stats(const real* __restrict__ x, Walk w, real p) {
    constexpr int L = sizeof(P) / sizeof(real);
    const real q = w.e < w.end ? x[w.i * L] : p;
    real s1[L], s2[L];
    for (int j = 0; j < L; ++j) s1[j] = s2[j] = 0;
    unsigned items = 0;
    for (; w.e < w.end; walk_next(w), ++items) {
        P v = load<P>(x, w.i);
        for (int j = 0; j < L; ++j) {
            real d = v.v[j] - q;
            s1[j] += d;
            s2[j] += d * d;
        }
    }
    Stats st = {0, 0, 0};
    if (items) {
        real t1 = 0, t2 = 0;
        for (int j = 0; j < L; ++j) {
            t1 += s1[j];
            t2 += s2[j];
        }
        st.n = real(items * L);
        real shift = t1 / st.n;                  // the thread's mean - q
        st.mean = (q - p) + shift;
        st.m2 = max(t2 - t1 * shift, real(0));
    }
    return st;
}

// The Stats of the whole block, in thread 0 (blockDim.x a multiple of 32, at
// most BN_THREADS). A second call needs a __syncthreads before it.
__device__ Stats block_stats(Stats st) {
    __shared__ Stats warp_stats[NWARPS];
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
        st = total;
    }
    return st;
}

// The sums a and b of the whole block, in thread 0 (as block_stats).
__device__ void block_sums(real& a, real& b) {
    __shared__ real warp_sums[NWARPS][2];
    for (int off = 16; off > 0; off /= 2) {
        a += __shfl_down_sync(0xffffffffu, a, off);
        b += __shfl_down_sync(0xffffffffu, b, off);
    }
    if (threadIdx.x % 32 == 0) {
        warp_sums[threadIdx.x / 32][0] = a;
        warp_sums[threadIdx.x / 32][1] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        real ta = 0, tb = 0;
        for (int w = 0; w < blockDim.x / 32; ++w) {
            ta += warp_sums[w][0];
            tb += warp_sums[w][1];
        }
        a = ta;
        b = tb;
    }
}

// ---------------------------------------------------------------------------
// The last block of a channel. Called by thread 0 once its block's partial is
// written: the fence publishes it before the count does; true for the block
// that arrives last (the second fence orders its reads of the others' after).
__device__ __forceinline__ bool last_to_arrive(unsigned* count, int splits) {
    __threadfence();
    bool last = atomicAdd(count, 1u) == unsigned(splits - 1);
    if (last) __threadfence();
    return last;
}

// A partial another block of this launch wrote, read from L2 (an atomic).
__device__ __forceinline__ real read_partial(real* p) {
    return atomicAdd(p, real(0));
}

// 1. Statistics of channel blockIdx.y over chunk blockIdx.x; partial results
//    part[(c * splits + s) * 3 + {0, 1, 2}] = count, mean - p, M2. The channel's
//    last block merges them into mean, invstd and, when update != 0, the
//    running statistics.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_fwd_reduce(const real* __restrict__ x, real* __restrict__ part, unsigned* __restrict__ count,
              real* __restrict__ mean, real* __restrict__ invstd,
              real* __restrict__ running_mean, real* __restrict__ running_var, int N, int C,
              int HW, int splits, int vec, real eps, real momentum, int update) {
    __shared__ int last;
    if (blockDim.x > BN_THREADS || blockDim.x % 32) __trap();  // warp_stats: BN_THREADS / 32
    const int c = blockIdx.y;
    const real p = x[c * HW];  // the pivot: the channel's first value
    Stats st;
    if (vec)
        st = thread_stats<Vec>(x, walk_start<Vec>(N, C, HW, splits), p);
    else
        st = thread_stats<Scalar>(x, walk_start<Scalar>(N, C, HW, splits), p);
    st = block_stats(st);
    if (threadIdx.x == 0) {
        real* out = part + (c * splits + blockIdx.x) * 3;
        out[0] = st.n;
        out[1] = st.mean;
        out[2] = st.m2;
        last = last_to_arrive(count + c, splits);
    }
    __syncthreads();
    if (!last) return;
    st.n = st.mean = st.m2 = 0;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        real* at = part + (c * splits + s) * 3;
        Stats o = {read_partial(at), read_partial(at + 1), read_partial(at + 2)};
        st = stats_merge(st, o);
    }
    st = block_stats(st);
    if (threadIdx.x == 0) {
        real is = 1 / sqrt(st.m2 / st.n + eps);
        mean[c] = p + st.mean;
        invstd[c] = is;
        if (update) {
            running_mean[c] = (1 - momentum) * running_mean[c] + momentum * (p + st.mean);
            running_var[c] = (1 - momentum) * running_var[c] + momentum * st.m2 / (st.n - 1);
        }
        count[c] = 0;  // ready for the next launch
    }
}

// 2. y = (x - mean) * k + beta, then ReLU if relu != 0.
template <class P>
__device__ void fwd_apply(const real* __restrict__ x, real* __restrict__ y, Walk w, real mu,
                          real k, real b, int relu) {
    constexpr int L = sizeof(P) / sizeof(real);
    for (; w.e < w.end; walk_next(w)) {
        P v = load<P>(x, w.i);
        for (int j = 0; j < L; ++j) {
            real a = affine(v.v[j] - mu, k, b);
            v.v[j] = relu && a < 0 ? 0 : a;
        }
        store<P>(y, w.i, v);
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_fwd_apply(const real* __restrict__ x, real* __restrict__ y, const real* __restrict__ mean,
             const real* __restrict__ invstd, const real* __restrict__ gamma,
             const real* __restrict__ beta, int N, int C, int HW, int splits, int vec, int relu) {
    const int c = blockIdx.y;
    const real mu = mean[c], k = gamma[c] * invstd[c], b = beta[c];
    if (vec)
        fwd_apply<Vec>(x, y, walk_start<Vec>(N, C, HW, splits), mu, k, b, relu);
    else
        fwd_apply<Scalar>(x, y, walk_start<Scalar>(N, C, HW, splits), mu, k, b, relu);
}

// 3. Sums of g and g * (x - mean) of channel blockIdx.y over chunk blockIdx.x;
//    partials part[(c * splits + s) * 2 + {0, 1}]. The channel's last block
//    merges them: gbeta = sum(g), ggamma = invstd * sum(g * (x - mean)).
template <class P>
__device__ void grad_sums(const real* __restrict__ gy, const real* __restrict__ x, Walk w,
                          real mu, real k, real b, int relu, real& sg, real& sgx) {
    constexpr int L = sizeof(P) / sizeof(real);
    for (; w.e < w.end; walk_next(w)) {
        P g = load<P>(gy, w.i), v = load<P>(x, w.i);
        for (int j = 0; j < L; ++j) {
            real d = v.v[j] - mu, m = masked(g.v[j], d, k, b, relu);
            sg += m;
            sgx += m * d;
        }
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_bwd_reduce(const real* __restrict__ gy, const real* __restrict__ x,
              const real* __restrict__ mean, const real* __restrict__ invstd,
              const real* __restrict__ gamma, const real* __restrict__ beta,
              real* __restrict__ part, unsigned* __restrict__ count, real* __restrict__ ggamma,
              real* __restrict__ gbeta, int N, int C, int HW, int splits, int vec, int relu) {
    __shared__ int last;
    if (blockDim.x > BN_THREADS || blockDim.x % 32) __trap();  // warp_sums: BN_THREADS / 32
    const int c = blockIdx.y;
    const real mu = mean[c], is = invstd[c], k = gamma[c] * is, b = beta[c];
    real sg = 0, sgx = 0;
    if (vec)
        grad_sums<Vec>(gy, x, walk_start<Vec>(N, C, HW, splits), mu, k, b, relu, sg, sgx);
    else
        grad_sums<Scalar>(gy, x, walk_start<Scalar>(N, C, HW, splits), mu, k, b, relu, sg, sgx);
    block_sums(sg, sgx);
    if (threadIdx.x == 0) {
        part[(c * splits + blockIdx.x) * 2] = sg;
        part[(c * splits + blockIdx.x) * 2 + 1] = sgx;
        last = last_to_arrive(count + c, splits);
    }
    __syncthreads();
    if (!last) return;
    sg = sgx = 0;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        sg += read_partial(part + (c * splits + s) * 2);
        sgx += read_partial(part + (c * splits + s) * 2 + 1);
    }
    block_sums(sg, sgx);
    if (threadIdx.x == 0) {
        gbeta[c] = sg;
        ggamma[c] = sgx * is;
        count[c] = 0;  // ready for the next launch
    }
}

// 4. gx = k * g + kx * (x - mean) + k0, kx = -k * invstd * ggamma * inv_count,
//    k0 = -k * gbeta * inv_count. inv_count = 1 / M in training; 0 in
//    inference, where the statistics are constants.
template <class P>
__device__ void bwd_apply(const real* __restrict__ gy, const real* __restrict__ x,
                          real* __restrict__ gx, Walk w, real mu, real k, real b, real kx,
                          real k0, int relu) {
    constexpr int L = sizeof(P) / sizeof(real);
    for (; w.e < w.end; walk_next(w)) {
        P g = load<P>(gy, w.i), v = load<P>(x, w.i);
        for (int j = 0; j < L; ++j) {
            real d = v.v[j] - mu;
            g.v[j] = k * masked(g.v[j], d, k, b, relu) + kx * d + k0;
        }
        store<P>(gx, w.i, g);
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_bwd_apply(const real* __restrict__ gy, const real* __restrict__ x,
             const real* __restrict__ mean, const real* __restrict__ invstd,
             const real* __restrict__ gamma, const real* __restrict__ beta,
             const real* __restrict__ ggamma, const real* __restrict__ gbeta,
             real* __restrict__ gx, int N, int C, int HW, int splits, int vec, real inv_count,
             int relu) {
    const int c = blockIdx.y;
    const real mu = mean[c], is = invstd[c], k = gamma[c] * is, b = beta[c];
    const real kx = -k * is * ggamma[c] * inv_count;
    const real k0 = -k * gbeta[c] * inv_count;
    if (vec)
        bwd_apply<Vec>(gy, x, gx, walk_start<Vec>(N, C, HW, splits), mu, k, b, kx, k0, relu);
    else
        bwd_apply<Scalar>(gy, x, gx, walk_start<Scalar>(N, C, HW, splits), mu, k, b, kx, k0,
                          relu);
}

// 5. Inference: invstd of the running variance (the mean is running_mean).
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_infer_prepare(const real* __restrict__ running_var, real eps, int C,
                 real* __restrict__ invstd) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    invstd[c] = 1 / sqrt(running_var[c] + eps);
}
