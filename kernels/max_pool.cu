// max_pool.cu -- 2-D max pooling (ResNeXt's stem: 3x3, stride 2, padding 1 on
// a (N, 64, 112, 112) map), forward with the winning tap, and backward.
//
// Legend: x (N, C, H, W), y and argmax (N, C, P, Q); window kh x kw, stride
// (sh, sw), padding (ph, pw) counting as -inf.
//   y[n, c, p, q] = max over taps t = i * kw + j of x[n, c, p*sh-ph+i, q*sw-pw+j]
//   argmax[n, c, p, q] = the first tap (row-major) holding that maximum,
//                        as minitorch_gx/ops/pool.py (uint8: kh * kw < 256)
//   gx[n, c, h, w] = sum of gy[n, c, p, q] over the windows whose argmax is (h, w)
// The backward gathers instead of scattering: each input pixel visits the few
// windows that contain it (at most 4 for 3x3 stride 2), so there are no
// atomics and the result is deterministic.
//
// Threads: one per output element (forward) or input element (backward), a
// grid-stride loop over the flat NCHW index. Launch: grid
// (min(ceil(total / POOL_THREADS), 65535)), block (POOL_THREADS, or fewer).
// Launchers: minitorch_gx/cuda/pool.py max_pool2d_forward / max_pool2d_backward, called by
// ops/pool.py MaxPool2d; tested against ops/pool.py max_pool2d_forward_reference /
// max_pool2d_backward_reference (tests/ops/test_pool.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef POOL_THREADS
#define POOL_THREADS 256
#endif

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
max_pool2d_fwd(const real* __restrict__ x, real* __restrict__ y,
               unsigned char* __restrict__ argmax, int N, int C, int H, int W, int P, int Q,
               int kh, int kw, int sh, int sw, int ph, int pw) {
    const int total = N * C * P * Q;
    for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < total; o += gridDim.x * blockDim.x) {
        int q = o % Q, p = (o / Q) % P, plane = o / (P * Q);  // plane = n * C + c
        const real* xp = x + plane * H * W;
        int h0 = p * sh - ph, w0 = q * sw - pw;
        real best = 0;
        int arg = 0;
        for (int i = 0; i < kh; ++i)
            for (int j = 0; j < kw; ++j) {
                int h = h0 + i, w = w0 + j, t = i * kw + j;
                bool inside = (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W;
                // padding is -inf: it only "wins" as tap 0 of a window whose
                // other taps are all -inf too (impossible with padding <= kernel/2)
                real v = inside ? xp[h * W + w] : -__int_as_float(0x7f800000);
                if (t == 0 || v > best) {
                    best = v;
                    arg = t;
                }
            }
        y[o] = best;
        argmax[o] = (unsigned char)arg;
    }
}

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
max_pool2d_bwd(const real* __restrict__ gy, const unsigned char* __restrict__ argmax,
               real* __restrict__ gx, int N, int C, int H, int W, int P, int Q, int kh, int kw,
               int sh, int sw, int ph, int pw) {
    const int total = N * C * H * W;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int w = i % W, h = (i / W) % H, plane = i / (H * W);
        // windows p with p*sh - ph <= h <= p*sh - ph + kh - 1
        int hp = h + ph, wp = w + pw;
        int p_lo = hp - kh + 1 > 0 ? (hp - kh + 1 + sh - 1) / sh : 0, p_hi = min(P - 1, hp / sh);
        int q_lo = wp - kw + 1 > 0 ? (wp - kw + 1 + sw - 1) / sw : 0, q_hi = min(Q - 1, wp / sw);
        real sum = 0;
        for (int p = p_lo; p <= p_hi; ++p)
            for (int q = q_lo; q <= q_hi; ++q) {
                int o = (plane * P + p) * Q + q;
                int t = (hp - p * sh) * kw + (wp - q * sw);
                if (argmax[o] == t) sum += gy[o];
            }
        gx[i] = sum;
    }
}
