// grouped_conv_bwd_weight.cu -- the gradient of a grouped 2-D convolution with
// respect to its filters.
//
// Legend (NCHW, as grouped_conv.cu):
//   N batch, C input channels, H x W input, K output channels, P x Q output
//   G groups, Cg = C / G, Kg = K / G, R x S filter, stride (sh, sw), padding (ph, pw)
//   gy (N, K, P, Q)   x (N, C, H, W)   gW (K, Cg, R, S)
//   gy and x in NCHW or CNHW memory: their image and channel strides are
//   arguments (see grouped_conv.cu)
//
//   gW[g*Kg+k, c, r, s] = sum_{n, p, q} gy[n, g*Kg+k, p, q] * x[n, g*Cg+c, p*sh-ph+r, q*sw-pw+s]
//
// Per group this is GW_g (Kg x CgRS) = GY_g (Kg x NPQ) * X_g^T (NPQ x CgRS): a
// small output (4x36 to 32x288 numbers per group for ResNeXt) summed over a
// very long dimension (NPQ = 256*56*56 = 802,816 pixels in layer1 at batch
// 256). So the pixels are split across blocks and each block adds its partial
// sums into gW with atomicAdd (the launcher zeroes gW first); the order of
// those additions varies from run to run, in the last bits only.
//
// Threads
//   A block owns one "piece" of gW -- one group g, one input channel c, KT = 4
//   output channels k0..k0+3 and TAPS = 9 filter taps (r, s) -- and a share of
//   the pixels. Each thread walks its pixels j = (n, p, q) (consecutive threads
//   take consecutive pixels, so gy loads are coalesced), loads KT values of gy
//   and TAPS values of x, and keeps KT x TAPS = 36 running sums in registers
//   (36 multiply-adds per 13 loads). The block then sums the 36 values over
//   its threads (through shared memory, then warp shuffles) and adds each
//   total into gW with one atomicAdd.
//   Launch: grid (G * Cg * ceil(Kg / KT) * ceil(RS / TAPS), splits), block
//   (WGRAD_THREADS); blockIdx.y picks the share of pixels: pixel j goes to
//   split (j / WGRAD_THREADS) % splits. Launcher: minitorch_gx/cuda/conv.py
//   conv2d_backward_weight, called by ops/conv.py; tested against ops/conv.py
//   conv2d_backward_weight_reference (tests/ops/test_conv.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef WGRAD_THREADS
#define WGRAD_THREADS 256   // a multiple of 32, at most 1024
#endif

#define KT 4
#define TAPS 9
#define NWARPS (WGRAD_THREADS / 32)

extern "C" __global__ void __launch_bounds__(WGRAD_THREADS)
grouped_conv2d_bwd_weight(const real* __restrict__ gy, const real* __restrict__ x,
                          real* __restrict__ gW, int N, int C, int H, int Wd, int K, int P,
                          int Q, int G, int R, int S, int sh, int sw, int ph, int pw,
                          int gysn, int gysc, int xsn, int xsc) {
    __shared__ real red[TAPS][WGRAD_THREADS];

    if (blockDim.x != WGRAD_THREADS) __trap();  // red and the strides assume this size
    const int Cg = C / G, Kg = K / G, RS = R * S, PQ = P * Q;
    const int J = N * PQ;
    // Which piece of gW this block owns.
    const int ktiles = (Kg + KT - 1) / KT, ttiles = (RS + TAPS - 1) / TAPS;
    int piece = blockIdx.x;
    const int tap0 = (piece % ttiles) * TAPS;
    piece /= ttiles;
    const int k0 = (piece % ktiles) * KT;
    piece /= ktiles;
    const int c = piece % Cg;
    const int g = piece / Cg;

    // The (r, s) of this block's taps; invalid taps (past RS) are never used.
    int tap_r[TAPS], tap_s[TAPS];
    for (int t = 0; t < TAPS; ++t) {
        int rs = tap0 + t < RS ? tap0 + t : 0;
        tap_r[t] = rs / S;
        tap_s[t] = rs - (rs / S) * S;
    }
    const int kvalid = Kg - k0 < KT ? Kg - k0 : KT;

    real acc[KT][TAPS];
    for (int a = 0; a < KT; ++a)
        for (int t = 0; t < TAPS; ++t) acc[a][t] = 0;

    const int stride = gridDim.y * WGRAD_THREADS;
    for (int j = blockIdx.y * WGRAD_THREADS + threadIdx.x; j < J; j += stride) {
        int n = j / PQ, pq = j - n * PQ, p = pq / Q, q = pq - (pq / Q) * Q;
        real gv[KT];
        const real* gyp = gy + n * gysn + (g * Kg + k0) * gysc + pq;
        for (int a = 0; a < KT; ++a) gv[a] = a < kvalid ? gyp[a * gysc] : 0;
        const real* xp = x + n * xsn + (g * Cg + c) * xsc;
        int h0 = p * sh - ph, w0 = q * sw - pw;
        for (int t = 0; t < TAPS; ++t) {
            int h = h0 + tap_r[t], w = w0 + tap_s[t];
            real xv = (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)Wd ? xp[h * Wd + w] : 0;
            for (int a = 0; a < KT; ++a) acc[a][t] += gv[a] * xv;
        }
    }

    // Sum each of the KT*TAPS values over the block, one output channel a at
    // a time: every thread stores its TAPS sums in shared memory (row t,
    // column = thread), then warp w adds up rows w, w + NWARPS, ...: each lane
    // sums a strided part of the row, five shuffles finish it, lane 0 adds
    // the block's total into gW. (A shuffle tree per value would cost 36 x 5
    // shuffles per warp; this costs 4 rounds of at most 2 x 5.)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int a = 0; a < KT; ++a) {
        for (int t = 0; t < TAPS; ++t) red[t][threadIdx.x] = acc[a][t];
        __syncthreads();
        for (int t = warp; t < TAPS; t += NWARPS) {
            real v = 0;
            for (int i = lane; i < WGRAD_THREADS; i += 32) v += red[t][i];
            for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0 && a < kvalid && tap0 + t < RS)
                atomicAdd(&gW[((g * Kg + k0 + a) * Cg + c) * RS + tap0 + t], v);
        }
        __syncthreads();  // red is rewritten by the next round
    }
}
