// grouped_conv.cu -- grouped 2-D convolution: forward and backward-data, each
// a direct convolution of one shared-memory tile per block.
//
// Legend (NCHW, as minitorch_gx/ops/conv.py):
//   N batch, C input channels, H x W input, K output channels, P x Q output
//   G groups, Cg = C / G input and Kg = K / G output channels per group
//   R x S filter, stride (sh, sw), padding (ph, pw), RS = R * S
//   x (N, C, H, W)   W (K, Cg, R, S)   y (N, K, P, Q)
// Memory layout: each image plane (H x W) is contiguous; where plane (n, c)
// starts is given by an image stride and a channel stride (elements), for x
// and y separately: NCHW is (C*H*W, H*W), and CNHW -- the layout the GPU path
// keeps activations in, so that a 1x1 convolution is one GEMM over N*H*W
// columns (minitorch_gx/cuda/conv.py) -- is (H*W, N*H*W).
//
// Forward
//   y[n, g*Kg+k, p, q] = sum_{c, r, s} W[g*Kg+k, c, r, s] * x[n, g*Cg+c, p*sh-ph+r, q*sw-pw+s]
//   (x reads 0 outside the image). Per group a matrix product
//       Y_g (Kg x NPQ) = W_g (Kg x CgRS) * X_g (CgRS x NPQ),
//   X_g being the input patch under each output pixel (im2col). An im2col
//   gather reads every x value R*S times, and each gathered value feeds only
//   Kg (4..32) multiply-adds. Here a block copies the input rows under its
//   pixels into shared memory once, halo included, and every value there
//   feeds R*S*Kg of them.
// Backward data (the gradient of x)
//   gx[n, g*Cg+c, h, w] = sum_{k, r, s} W[g*Kg+k, c, r, s] * gy[n, g*Kg+k, p, q]
//   over the taps whose p = (h+ph-r)/sh and q = (w+pw-s)/sw are whole numbers
//   inside the output. Split gx by "phase" (h mod sh, w mod sw): the pixels of
//   one phase, h = fh + sh*i, are reached by the taps r = r0 + sh*t only
//   (r0 = (fh+ph) mod sh), from gy rows p = i + d0 - t (d0 = (fh+ph-r0)/sh).
//   So each phase is a stride-1 correlation of gy with a flipped sub-filter,
//   the same computation as the forward one: both kernels share one body,
//   conv_tile<BACKWARD>, and no tap is ever wasted on a zero (ResNeXt's
//   stride-2 layers have 4 phases of 4, 2, 2 and 1 taps).
//
// The correlation a block computes, per axis (struct Axis; rows shown):
//   out[i] += in[i*step + t - pad] * filter tap (first + dir*t),  t < taps,
//   written at dst row phase + dst_step*i. Forward: step sh, pad ph, taps R,
//   tap t; backward, phase fh: step 1, taps ceil((R-r0)/sh), tap r0+sh*(taps-1-t).
// Names: M the output channels of the group (Kg forward, Cg backward), Min
// the channels read (Cg forward, Kg backward), J the output pixels (n, i, q)
// of one phase and column tile, flattened in this order.
//
// Tiling and threads
//   A block of CONV_THREADS (256) threads computes BM channels of one group
//   by BN consecutive output pixels j0 .. j0+BN-1.
//   - BM is the smallest of 4, 8, 16, 32 that covers M (capped at 32), passed
//     by the launcher: ResNeXt's 32x4d groups have 4, 8, 16 and 32 channels.
//   - Each thread owns a TM x TN register tile: TM = CONV_TM consecutive
//     channels (4 when BM is 4, else 8: a -D define from the launcher) by TN =
//     8 pixels spaced TCOLS apart, so that neighbouring threads read
//     neighbouring pixels. Threads form BM/TM rows by TCOLS = THREADS/(BM/TM)
//     columns, so BN = TCOLS * TN: 2048 pixels for BM = 4 and 8, 1024 for 16,
//     512 for 32.
//   - The input tile. Stack the images' rows, each image padded to the Hv =
//     (P-1)*step + taps rows its output rows need ("virtual rows"): the BN
//     pixels then need one contiguous run of virtual rows, across image
//     boundaries, so a block wastes no pixel slot on a partial image. The tile
//     holds those rows, TIW = (TQ-1)*step + taps columns wide (padding
//     included, as zeros), for CK channels at a time (a "chunk"); after it,
//     the chunk's filter taps, [channel][t][u][BM] (BM contiguous). Both live
//     in one shared pool of CONV_POOL_BYTES; each block picks the largest
//     CK that fits its rows, balanced over the chunks.
//   - Per chunk: the threads fill the tile -- each thread walks tile
//     positions THREADS apart (neighbouring threads, neighbouring addresses),
//     FILL = 4 channels of a position at a time, two positions per step (the
//     loop is unrolled by 2, and every load is issued before the stores: 8
//     independent global loads in flight; ceil(CK/4) passes) -- and the
//     filter taps (4 loads in flight); a barrier; then per tap (channel, t, u) a thread
//     reads TM weights with vector loads (broadcast: a warp shares its
//     channels) and TN inputs, and does TM x TN multiply-adds (32 or 64 per
//     9 or 10 shared reads); a barrier. Shared offsets are kept in bytes
//     (at_byte) and the loop over u is unrolled by 3, so that an input read
//     costs one add per pixel and filter row, then an immediate offset.
//   - No integer division inside a loop: positions are carried as digits
//     (struct Digits) stepped with carries; divisions happen once per thread.
//   - Wide images: the launcher cuts the output columns into tiles of TQ (one
//     tile, TQ = Q, unless a padded row would not fit in the pool).
//   Launch: grid (ceil(J / BN), G * ceil(M / BM), phases * column tiles)
//   (phases = sh*sw backward, 1 forward; blocks past a phase's J return),
//   block (CONV_THREADS) -- exactly: the geometry is compiled in, another
//   size traps -- no dynamic shared memory. Launchers:
//   minitorch_gx/cuda/conv.py conv2d_forward and conv2d_backward_data, called
//   by ops/conv.py; tested against ops/conv.py conv2d_forward_reference /
//   conv2d_backward_data_reference (tests/ops/test_conv.py) and against the
//   kernels this file replaced (tests/cuda/test_grouped_conv_kernels.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef CONV_THREADS
#define CONV_THREADS 256   // a power of two, 32..256
#endif
#ifndef CONV_TM
#define CONV_TM 8          // channels per thread: 4 or 8 (conv.py picks it from BM)
#endif
#ifndef CONV_POOL_BYTES
#define CONV_POOL_BYTES (47 * 1024)  // the input tile and the weight tile
#endif

#define TM CONV_TM
#define TN 8
#define BM_MAX 32
#define FILL 4
#define POOL_ELEMS (CONV_POOL_BYTES / (int)sizeof(real))
// Two blocks per SM in float32 (at most 128 registers a thread); float64
// register tiles need more.
#define MIN_BLOCKS (sizeof(real) == 4 ? 2 : 1)

struct ConvShape {
    int N, C, H, W, K, P, Q, G, R, S, sh, sw, ph, pw;
    int src_sn, src_sc, dst_sn, dst_sc;  // image and channel strides of what is read / written
};

// TM weights are read as vectors of four (LDS.128 for float); 16-byte aligned
// through its first member, so that the emulator's translation sees its name.
struct real4 {
    __align__(16) real x;
    real y, z, w;
};

// The digits (n, a, b) of i = (n*A + a)*B + b: an output pixel (n, i, q), or
// a tile position (n, virtual row, column). advance() adds a step given by its
// own digits, carrying, so that a loop that strides through positions never
// divides.
struct Digits {
    int n, a, b;
};

__device__ __forceinline__ Digits digits(int i, int A, int B) {
    Digits d;
    const int ab = i / B;
    d.b = i - ab * B;
    d.n = ab / A;
    d.a = ab - d.n * A;
    return d;
}

__device__ __forceinline__ void advance(Digits& x, const Digits& step, int A, int B) {
    x.b += step.b;
    if (x.b >= B) { x.b -= B; ++x.a; }
    x.a += step.a;
    if (x.a >= A) { x.a -= A; ++x.n; }
    x.n += step.n;
}

// One axis (rows or columns) of the correlation a block computes; see the header.
struct Axis {
    int count;     // output positions i along it (rows P, or gx rows of the phase)
    int taps;      // filter taps t that reach them
    int step;      // input position of i, tap 0: i*step - pad
    int pad;
    int first;     // filter index of tap t: first + dir*t
    int dir;
    int phase;     // destination index of i: phase + dst_step*i
    int dst_step;
};

__device__ __forceinline__ Axis forward_axis(int out, int R, int stride, int pad) {
    Axis a = {out, R, stride, pad, 0, 1, 0, 1};
    return a;
}

// Backward data: the gx positions fh + stride*i, read from gy[i + t - pad]
// with t ascending, so the filter runs backwards from r0 + stride*(taps-1).
__device__ __forceinline__ Axis backward_axis(int size, int R, int stride, int pad, int fh) {
    const int r0 = (fh + pad) % stride;
    const int taps = r0 < R ? (R - r0 + stride - 1) / stride : 0;
    const int d0 = (fh + pad - r0) / stride;
    const int count = size > fh ? (size - fh + stride - 1) / stride : 0;
    Axis a = {count, taps, 1, taps - 1 - d0, r0 + stride * (taps - 1), -stride, fh, stride};
    return a;
}

// The value `bytes` bytes past p. The loops keep their shared-memory offsets
// in bytes: a read is then one add (nvcc scales an element index at every read).
__device__ __forceinline__ real at_byte(const real* p, int bytes) {
    return reinterpret_cast<const real*>(reinterpret_cast<const char*>(p) + bytes)[0];
}

__device__ __forceinline__ void load_weights(real (&a)[TM], const real* p) {
#pragma unroll
    for (int q = 0; q < TM / 4; ++q) {
        const real4 w = reinterpret_cast<const real4*>(p)[q];
        a[4 * q] = w.x;
        a[4 * q + 1] = w.y;
        a[4 * q + 2] = w.z;
        a[4 * q + 3] = w.w;
    }
}

template <bool BACKWARD>
__device__ void conv_tile(const real* __restrict__ src, const real* __restrict__ Wt,
                          real* __restrict__ dst, const ConvShape d, int BM) {
    __shared__ __align__(16) real pool[POOL_ELEMS];  // input tile, then weight tile

    // the tile geometry is compiled for this block size; BM a power of two TM..32
    if (blockDim.x != CONV_THREADS || BM < TM || BM > BM_MAX || (BM & (BM - 1))) __trap();
    const int Cg = d.C / d.G, Kg = d.K / d.G, RS = d.R * d.S;
    // Forward reads x (C, H, W) and writes y (K, P, Q); backward reads gy (K, P, Q)
    // and writes gx (C, H, W).
    const int M = BACKWARD ? Cg : Kg;                   // channels per group written
    const int Min = BACKWARD ? Kg : Cg;                 // channels per group read
    const int Hin = BACKWARD ? d.P : d.H, Win = BACKWARD ? d.Q : d.W;
    const int Wdst = BACKWARD ? d.W : d.Q;

    // blockIdx.z: the phase (backward) and the column tile.
    const int phases = BACKWARD ? d.sh * d.sw : 1;
    const int ncol = gridDim.z / phases;
    const int phase = blockIdx.z / ncol, col_tile = blockIdx.z - phase * ncol;
    const Axis ar = BACKWARD ? backward_axis(d.H, d.R, d.sh, d.ph, phase / d.sw)
                             : forward_axis(d.P, d.R, d.sh, d.ph);
    const Axis ac = BACKWARD ? backward_axis(d.W, d.S, d.sw, d.pw, phase % d.sw)
                             : forward_axis(d.Q, d.S, d.sw, d.pw);
    const int TQ = (ac.count + ncol - 1) / ncol, q0 = col_tile * TQ;
    const int TQt = min(TQ, ac.count - q0);              // this tile's columns
    const int J = TQt > 0 ? d.N * ar.count * TQt : 0;    // its pixels (n, i, q - q0)

    const int trows = BM / TM, tcols = CONV_THREADS / trows, BN = tcols * TN;
    const int j0 = blockIdx.x * BN;
    if (j0 >= J) return;  // the whole block: this phase or tile has fewer pixels
    const int mtiles = (M + BM - 1) / BM;
    const int g = blockIdx.y / mtiles, m0 = (blockIdx.y - g * mtiles) * BM;
    const int t = threadIdx.x, tr = t / tcols, tc = t - tr * tcols;

    // The tile: virtual rows vr0 .. vr0+rows-1 (image n's row h is virtual row
    // n*Hv + h + pad), TIW columns from input column colbase.
    const int RT = ar.taps, ST = ac.taps, taps = RT * ST;
    const int Hv = (ar.count - 1) * ar.step + RT;
    const int TIW = (TQt - 1) * ac.step + ST;
    const int colbase = q0 * ac.step - ac.pad;
    const Digits first = digits(j0, ar.count, TQt);
    const Digits last = digits(min(J, j0 + BN) - 1, ar.count, TQt);
    const int vr0 = first.n * Hv + first.a * ar.step;
    const int pitch = (last.n * Hv + last.a * ar.step + RT - vr0) * TIW;  // one channel

    // This thread's TN pixels j0 + tc + v*tcols: where their window starts in
    // the tile, in bytes, and where they are written (-1: past the last pixel).
    int pix[TN], out[TN];
    {
        Digits px = digits(j0 + tc, ar.count, TQt);  // (n, i, q - q0)
        const Digits step = digits(tcols, ar.count, TQt);
#pragma unroll
        for (int v = 0; v < TN; ++v) {
            const bool ok = j0 + tc + v * tcols < J;
            const int elems = (px.n * Hv + px.a * ar.step - vr0) * TIW + px.b * ac.step;
            pix[v] = ok ? elems * (int)sizeof(real) : 0;
            out[v] = ok ? px.n * d.dst_sn + (ar.phase + ar.dst_step * px.a) * Wdst + ac.phase +
                              ac.dst_step * (q0 + px.b)
                        : -1;
            advance(px, step, ar.count, TQt);
        }
    }

    real acc[TM][TN];
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
        for (int v = 0; v < TN; ++v) acc[u][v] = 0;

    if (taps > 0) {  // (a phase no tap reaches is all zeros)
        // CK channels per chunk: as many as fit, spread evenly over the chunks.
        const int fit = (POOL_ELEMS - 3) / (pitch + taps * BM);  // (-3: Ws is 16-byte aligned)
        if (fit < 1) __trap();  // conv.py cuts wide images into column tiles so that it fits
        const int chunks = (Min + fit - 1) / fit, CK = (Min + chunks - 1) / chunks;
        const int ws_off = (CK * pitch + 3) / 4 * 4;  // pool: Xs [CK][pitch], then Ws

        // Tile fill: position e = t, t+THREADS, ... is virtual position
        // vr0*TIW + e, as digits (image, virtual row, column).
        Digits pos0 = {first.n, first.a * ar.step, 0};
        advance(pos0, digits(t, Hv, TIW), Hv, TIW);
        const Digits pos_step = digits(CONV_THREADS, Hv, TIW);
        // Weight fill: thread t writes channel m of rows wrow0, wrow0+wstep, ...,
        // row = (cc*RT + tt)*ST + u as digits (cc, tt, u).
        const int lg = __ffs(BM) - 1, wm = t & (BM - 1);
        const int wrow0 = t >> lg, wstep = CONV_THREADS >> lg;
        const Digits wtap0 = digits(wrow0, RT, ST), wtap_step = digits(wstep, RT, ST);
        const bool wm_ok = m0 + wm < M;
        // W[g*Kg+m, c, r, s] forward; W[g*Kg+c, m, r, s] backward (c the channel read)
        const int w_m = BACKWARD ? RS : Cg * RS, w_c = BACKWARD ? Cg * RS : RS;
        const int w0 = g * Kg * Cg * RS + m0 * w_m;

        for (int c0 = 0; c0 < Min; c0 += CK) {
            const int ckv = min(CK, Min - c0);
            for (int k0 = 0; k0 < ckv; k0 += FILL) {  // FILL channels per pass
                const int kn = min(FILL, ckv - k0);
                const int chan = (g * Min + c0 + k0) * d.src_sc;
                Digits pos = pos0;
#pragma unroll 2
                for (int e = t; e < pitch; e += CONV_THREADS) {
                    const int h = pos.a - ar.pad, w = pos.b + colbase;
                    const bool inside = (unsigned)h < (unsigned)Hin && (unsigned)w < (unsigned)Win;
                    const int off = pos.n * d.src_sn + chan + h * Win + w;
                    real v[FILL];
#pragma unroll
                    for (int k = 0; k < FILL; ++k)
                        v[k] = inside && k < kn ? src[off + k * d.src_sc] : 0;
#pragma unroll
                    for (int k = 0; k < FILL; ++k)
                        if (k < kn) pool[(k0 + k) * pitch + e] = v[k];
                    advance(pos, pos_step, Hv, TIW);
                }
            }
            Digits wt = wtap0;
            for (int row = wrow0; row < ckv * taps; row += 4 * wstep) {  // 4 loads, 4 stores
                real v[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int r = ar.first + ar.dir * wt.a, s = ac.first + ac.dir * wt.b;
                    const bool ok = wm_ok && row + k * wstep < ckv * taps;
                    v[k] = ok ? Wt[w0 + (c0 + wt.n) * w_c + wm * w_m + r * d.S + s] : 0;
                    advance(wt, wtap_step, RT, ST);
                }
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    if (row + k * wstep < ckv * taps)
                        pool[ws_off + (row + k * wstep) * BM + wm] = v[k];
            }
            __syncthreads();

            for (int cc = 0; cc < ckv; ++cc) {
                for (int tt = 0; tt < RT; ++tt) {
                    // this filter row's taps u = 0 .. ST-1, at each pixel (bytes)
                    int xrow[TN];
#pragma unroll
                    for (int v = 0; v < TN; ++v)
                        xrow[v] = pix[v] + (cc * pitch + tt * TIW) * (int)sizeof(real);
                    const real* wrow = pool + ws_off + (cc * RT + tt) * ST * BM + tr * TM;
#pragma unroll 3
                    for (int u = 0; u < ST; ++u) {
                        real a[TM], b[TN];
                        load_weights(a, wrow + u * BM);
#pragma unroll
                        for (int v = 0; v < TN; ++v)
                            b[v] = at_byte(pool, xrow[v] + u * (int)sizeof(real));
#pragma unroll
                        for (int i = 0; i < TM; ++i)
#pragma unroll
                            for (int v = 0; v < TN; ++v) acc[i][v] += a[i] * b[v];
                    }
                }
            }
            __syncthreads();  // the next chunk overwrites the tiles
        }
    }

#pragma unroll
    for (int v = 0; v < TN; ++v) {
        if (out[v] < 0) continue;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + tr * TM + i;
            if (m < M) dst[out[v] + (g * M + m) * d.dst_sc] = acc[i][v];
        }
    }
}

// y = conv(x, W). BM: rows of the output tile (see the header); (xsn, xsc)
// and (ysn, ysc): the image and channel strides of x and y.
extern "C" __global__ void __launch_bounds__(CONV_THREADS, MIN_BLOCKS)
grouped_conv2d_fwd(const real* __restrict__ x, const real* __restrict__ W, real* __restrict__ y,
                   int N, int C, int H, int Wd, int K, int P, int Q, int G, int R, int S,
                   int sh, int sw, int ph, int pw, int BM, int xsn, int xsc, int ysn, int ysc) {
    ConvShape d = {N, C, H, Wd, K, P, Q, G, R, S, sh, sw, ph, pw, xsn, xsc, ysn, ysc};
    conv_tile<false>(x, W, y, d, BM);
}

// gx = the gradient of conv(x, W) with respect to x, given gy.
extern "C" __global__ void __launch_bounds__(CONV_THREADS, MIN_BLOCKS)
grouped_conv2d_bwd_data(const real* __restrict__ gy, const real* __restrict__ W,
                        real* __restrict__ gx, int N, int C, int H, int Wd, int K, int P, int Q,
                        int G, int R, int S, int sh, int sw, int ph, int pw, int BM,
                        int gysn, int gysc, int gxsn, int gxsc) {
    ConvShape d = {N, C, H, Wd, K, P, Q, G, R, S, sh, sw, ph, pw, gysn, gysc, gxsn, gxsc};
    conv_tile<true>(gy, W, gx, d, BM);
}
