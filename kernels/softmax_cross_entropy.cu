// softmax_cross_entropy.cu -- softmax and cross-entropy with label smoothing
// in one pass over the logits (CuPy would spend one kernel each on max,
// subtract, exp, sum, log, gather and the smoothing sum).
//
// Legend: logits z (N, K), labels (N,) int64 in [0, K); the target puts `on`
// on the true class and `off` on every other (ops/loss.py: on = 1 - eps,
// off = eps / (K - 1); on = 1, off = 0 without smoothing), on + (K-1)*off = 1.
//   lse_i  = log sum_k exp(z_ik)                     (computed as m + log sum exp(z - m))
//   loss_i = -sum_k t_ik (z_ik - lse_i) = lse_i - (on - off) * z_{i,y_i} - off * sum_k z_ik
//   gz_ik  = (exp(z_ik - lse_i) - t_ik) * gloss_i
//
// Threads: forward, one block per row: the block reduces the row's max, then
// sum exp and sum z (shuffles within warps, shared memory across them).
// Backward, one thread per element. The mean (or sum) of the N losses, the
// value a training step reports, is one more block that adds them in a fixed
// order (softmax_xent_mean). Launch: forward grid (N), block (XENT_THREADS);
// backward grid (ceil(K / XENT_THREADS), N), block (XENT_THREADS); mean grid
// (1), block (XENT_THREADS).
// Launchers: minitorch_gx/cuda/loss.py softmax_cross_entropy_forward / _backward, called by
// ops/loss.py CrossEntropy; tested against ops/loss.py
// softmax_cross_entropy_forward_reference / _backward_reference (tests/ops/test_loss.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef XENT_THREADS
#define XENT_THREADS 256   // a multiple of 32, at most 1024
#endif
#define NWARPS (XENT_THREADS / 32)

// Sum (or max) of v over the block; every thread gets the result.
template <bool MAX>
__device__ real block_reduce(real v, real* scratch) {
    for (int off = 16; off > 0; off /= 2) {
        real o = __shfl_down_sync(0xffffffffu, v, off);
        v = MAX ? (o > v ? o : v) : v + o;
    }
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    real r = scratch[0];
    for (int w = 1; w < blockDim.x / 32; ++w)
        r = MAX ? (scratch[w] > r ? scratch[w] : r) : r + scratch[w];
    __syncthreads();  // scratch is reused by the next reduction
    return r;
}

extern "C" __global__ void __launch_bounds__(XENT_THREADS)
softmax_xent_fwd(const real* __restrict__ z, const long long* __restrict__ labels,
                 real* __restrict__ loss, real* __restrict__ lse, int N, int K, real on,
                 real off) {
    __shared__ real scratch[NWARPS];
    if (blockDim.x > XENT_THREADS || blockDim.x % 32) __trap();  // scratch: XENT_THREADS / 32
    const int i = blockIdx.x;
    const real* row = z + (long long)i * K;
    real m = -__int_as_float(0x7f800000);
    for (int k = threadIdx.x; k < K; k += blockDim.x) m = row[k] > m ? row[k] : m;
    m = block_reduce<true>(m, scratch);
    real se = 0, sz = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        se += exp(row[k] - m);
        sz += row[k];
    }
    se = block_reduce<false>(se, scratch);
    sz = block_reduce<false>(sz, scratch);
    if (threadIdx.x == 0) {
        real l = m + log(se);
        lse[i] = l;
        const long long y = labels[i];
        // a label outside [0, K) is never read through: its loss is NaN, which
        // the caller's non-finite check reports (no trap: on a GPU a trap ends
        // the process's CUDA context, and checking on the host would wait)
        loss[i] = y >= 0 && y < K ? l - (on - off) * row[y] - off * sz : (real)nan("");
    }
}

extern "C" __global__ void __launch_bounds__(XENT_THREADS)
softmax_xent_bwd(const real* __restrict__ z, const long long* __restrict__ labels,
                 const real* __restrict__ lse, const real* __restrict__ gloss,
                 real* __restrict__ gz, int N, int K, real on, real off, int gstride,
                 real gscale) {
    // row i's upstream gradient is gloss[i * gstride] * gscale: gstride 0 and
    // gscale 1/N for the mean of the losses, with no (N,) array made for it
    const int i = blockIdx.y, k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    long long e = (long long)i * K + k;
    const long long y = labels[i];
    real target = k == y ? on : off;
    gz[e] = y >= 0 && y < K ? (exp(z[e] - lse[i]) - target) * gloss[(long long)i * gstride] * gscale
                            : (real)nan("");
}

extern "C" __global__ void __launch_bounds__(XENT_THREADS)
softmax_xent_mean(const real* __restrict__ loss, real* __restrict__ out, int N, real scale) {
    // out[0] = scale * sum_i loss[i] (scale 1/N: the mean), summed in a fixed
    // order: each thread its strided share, then block_reduce's fixed tree
    __shared__ real scratch[NWARPS];
    if (blockDim.x > XENT_THREADS || blockDim.x % 32) __trap();  // scratch: XENT_THREADS / 32
    real s = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) s += loss[i];
    s = block_reduce<false>(s, scratch);
    if (threadIdx.x == 0) out[0] = s * scale;
}
