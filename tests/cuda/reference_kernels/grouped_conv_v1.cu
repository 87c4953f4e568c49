// grouped_conv.cu -- grouped 2-D convolution: forward and backward-data, each
// an implicit GEMM per group.
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
//   (x reads 0 outside the image). For one group g this is the matrix product
//       Y_g (Kg x NPQ) = W_g (Kg x CgRS) * X_g (CgRS x NPQ)
//   where column j = (n, p, q) of X_g is the input patch under output pixel j
//   (im2col). X_g is never stored: each tile of it is gathered from x straight
//   into shared memory ("implicit GEMM").
// Backward data (the gradient of x)
//   gx[n, g*Cg+c, h, w] = sum_{k, r, s} W[g*Kg+k, c, r, s] * gy[n, g*Kg+k, p, q]
//   over the taps whose p = (h+ph-r)/sh and q = (w+pw-s)/sw are whole numbers
//   inside the output. Per group:
//       GX_g (Cg x NHW) = W_g^T (Cg x KgRS) * GY_g (KgRS x NHW)
//   the same product with the roles of (K, P, Q) and (C, H, W) swapped, so both
//   kernels share one body, conv_gemm<BACKWARD>. With stride 2 three taps in
//   four gather a zero; those layers are 3 of ResNeXt's 16 grouped convs.
//
// Names in the GEMM: M rows (output channels of the group: Kg forward, Cg
// backward), J columns (output pixels: NPQ forward, NHW backward), I the
// reduction (CgRS forward, KgRS backward).
//
// Tiling and threads
//   A block of CONV_THREADS (256) threads computes a BM x BN tile of the output
//   matrix: BM channels of one group by BN pixels.
//   - BM is the smallest of 4, 8, 16, 32 that covers the group's M (capped at
//     32), passed by the launcher: ResNeXt's 32x4d groups have 4, 8, 16 and 32
//     channels and a tile taller than the group would be wasted work.
//   - Each thread owns a TM x TN = 4 x 4 register tile: TM consecutive
//     channels, TN pixels spaced TCOLS apart, so that neighbouring threads
//     touch neighbouring pixels (coalesced global access, no shared-memory
//     bank conflicts). Threads form BM/TM rows by TCOLS = THREADS/(BM/TM)
//     columns, so BN = TCOLS * TN: 1024, 512, 256, 128 pixels for BM = 4..32.
//   - The reduction is walked in chunks of BK = 2*BM (float) rows: the
//     gathered tile Bs is BK x BN = 8192 floats (32 KiB) whatever BM is, the
//     weight tile As BK x BM (+1 column of padding against bank conflicts).
//     Per chunk the threads load As and gather Bs (each thread: fixed
//     columns, rows strided), wait at a barrier, multiply-add from shared
//     memory into their registers, and wait again. The chunk's rows
//     (channel, r, s) are decoded once per block into a small table, so the
//     gather does no integer division (forward and stride-1 backward).
//   Launch: grid (ceil(J / BN), G * ceil(M / BM)), block (CONV_THREADS) --
//   exactly: the geometry is compiled in, another size traps -- no dynamic
//   shared memory. Launchers: minitorch_gx/cuda/conv.py conv2d_forward and
//   conv2d_backward_data, called by ops/conv.py; tested against ops/conv.py
//   conv2d_forward_reference / conv2d_backward_data_reference (tests/ops/test_conv.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef CONV_THREADS
#define CONV_THREADS 256   // a power of two, 32..256
#endif

#define TM 4
#define TN 4
#define BM_MAX 32
// Elements of the gathered tile: 32 KiB whatever the precision.
#define TILE_ELEMS (2 * CONV_THREADS * TM * TN * 4 / (int)sizeof(real))
#define BK_MAX (TILE_ELEMS * BM_MAX / (CONV_THREADS * TM * TN))

struct ConvShape {
    int N, C, H, W, K, P, Q, G, R, S, sh, sw, ph, pw;
    int src_sn, src_sc, dst_sn, dst_sc;  // image and channel strides of what is read / written
};

// The taps of one chunk of reduction rows, decoded once per block into shared
// memory (two buffers: the next chunk's are written while this one computes).
// Row i = (ch, r, s): off = ch*chan (+ r*Win + s forward), -1 past the end,
// chan being the channel stride of the input.
template <bool BACKWARD>
__device__ __forceinline__ void decode_taps(int (*tab)[BK_MAX], int i0, int BK, int I, int RS,
                                            int S, int chan, int Win) {
    for (int row = threadIdx.x; row < BK; row += CONV_THREADS) {
        int i = i0 + row, ch = i / RS, r = (i - ch * RS) / S, s = i - ch * RS - r * S;
        tab[0][row] = i < I ? ch * chan + (BACKWARD ? 0 : r * Win + s) : -1;
        tab[1][row] = r;
        tab[2][row] = s;
    }
}

template <bool BACKWARD>
__device__ void conv_gemm(const real* __restrict__ src, const real* __restrict__ Wt,
                          real* __restrict__ dst, const ConvShape d, int BM) {
    __shared__ real Bs[TILE_ELEMS];            // BK x BN gathered tile, row stride BN
    __shared__ real As[BK_MAX][BM_MAX + 1];    // BK x BM weight tile
    __shared__ int taps[2][3][BK_MAX];         // decode_taps, double-buffered

    const int Cg = d.C / d.G, Kg = d.K / d.G, RS = d.R * d.S;
    // Forward reads x (C, H, W) and writes y (K, P, Q); backward reads gy (K, P, Q)
    // and writes gx (C, H, W). "in" is what is gathered, "out" what is written.
    const int M = BACKWARD ? Cg : Kg;                   // channels per group written
    const int Min = BACKWARD ? Kg : Cg;                 // channels per group read
    const int Hin = BACKWARD ? d.P : d.H, Win = BACKWARD ? d.Q : d.W;
    const int Hout = BACKWARD ? d.H : d.P, Wout = BACKWARD ? d.W : d.Q;
    const int HWout = Hout * Wout;
    const int J = d.N * HWout, I = Min * RS;

    if (blockDim.x != CONV_THREADS) __trap();  // the tile geometry is compiled for this size
    const int mtiles = (M + BM - 1) / BM;
    const int g = blockIdx.y / mtiles;
    const int m0 = (blockIdx.y % mtiles) * BM;
    const int t = threadIdx.x;
    const int trows = BM / TM, tcols = CONV_THREADS / trows;
    const int BN = tcols * TN, BK = TILE_ELEMS / BN;
    const int j0 = blockIdx.x * BN;
    const int tr = t / tcols, tc = t % tcols;  // this thread's place in the tile

    // The columns this thread gathers, decoded once: pixel (n, a, b) of the
    // output image; the input position is a*stride - pad (+ r, s) forward,
    // a + pad (- r, s) backward. col_base: the image's group channels, plus
    // (forward) the window's corner. cols_per_thread is 1..4.
    const int span = BN < CONV_THREADS ? BN : CONV_THREADS;
    const int cols_per_thread = BN / span, row_step = CONV_THREADS / span;
    // (Loops over v run to the constant 4 and test v < cols_per_thread, so
    // these arrays stay in registers.)
    int col_base[4], col_a[4], col_b[4];
    bool col_ok[4];
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        int j = j0 + t % span + v * span;
        col_ok[v] = v < cols_per_thread && j < J;
        int n = col_ok[v] ? j / HWout : 0, ab = col_ok[v] ? j - n * HWout : 0;
        int a = ab / Wout, b = ab - (ab / Wout) * Wout;
        col_a[v] = BACKWARD ? a + d.ph : a * d.sh - d.ph;
        col_b[v] = BACKWARD ? b + d.pw : b * d.sw - d.pw;
        col_base[v] = n * d.src_sn + g * Min * d.src_sc +
                      (BACKWARD ? 0 : col_a[v] * Win + col_b[v]);
    }
    const bool unit_stride = d.sh == 1 && d.sw == 1;

    real acc[TM][TN];
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
        for (int v = 0; v < TN; ++v) acc[u][v] = 0;

    decode_taps<BACKWARD>(taps[0], 0, BK, I, RS, d.S, d.src_sc, Win);
    __syncthreads();
    for (int i0 = 0, buf = 0; i0 < I; i0 += BK, buf ^= 1) {
        // Weight tile As[row][m] = A[m0+m][i0+row]: consecutive threads read
        // consecutive reduction rows (contiguous in W forward).
        for (int e = t; e < BK * BM; e += CONV_THREADS) {
            int m = e / BK, row = e - m * BK, i = i0 + row, mm = m0 + m;
            real w = 0;
            if (mm < M && i < I) {
                if (!BACKWARD) {
                    w = Wt[(g * Kg + mm) * I + i];                    // W[g*Kg+mm, i]
                } else {
                    int k = i / RS, rs = i - k * RS;                 // W[g*Kg+k, mm, r, s]
                    w = Wt[((g * Kg + k) * Cg + mm) * RS + rs];
                }
            }
            As[row][m] = w;
        }
        // Gathered tile Bs[row][col]: the input value under tap i0+row of
        // output pixel j0+col, or 0 where the tap falls outside.
        for (int row = t / span; row < BK; row += row_step) {
            const int off = taps[buf][0][row], r = taps[buf][1][row], s = taps[buf][2][row];
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                if (v >= cols_per_thread) break;
                real val = 0;
                if (col_ok[v] && off >= 0) {
                    if (!BACKWARD) {
                        int hi = col_a[v] + r, wi = col_b[v] + s;
                        if ((unsigned)hi < (unsigned)Hin && (unsigned)wi < (unsigned)Win)
                            val = src[col_base[v] + off];
                    } else {
                        int ph = col_a[v] - r, pw = col_b[v] - s;
                        // integer division only when the stride needs it
                        int hi = unit_stride ? ph : ph / d.sh, wi = unit_stride ? pw : pw / d.sw;
                        bool on_grid = unit_stride || (ph >= 0 && pw >= 0 && hi * d.sh == ph &&
                                                       wi * d.sw == pw);
                        if (on_grid && (unsigned)hi < (unsigned)Hin && (unsigned)wi < (unsigned)Win)
                            val = src[col_base[v] + off + hi * Win + wi];
                    }
                }
                Bs[row * BN + t % span + v * span] = val;
            }
        }
        __syncthreads();
        // the next chunk's taps, into the other buffer (read after the next barrier)
        if (i0 + BK < I)
            decode_taps<BACKWARD>(taps[buf ^ 1], i0 + BK, BK, I, RS, d.S, d.src_sc, Win);
        for (int row = 0; row < BK; ++row) {
            real a[TM], b[TN];
#pragma unroll
            for (int u = 0; u < TM; ++u) a[u] = As[row][tr * TM + u];
#pragma unroll
            for (int v = 0; v < TN; ++v) b[v] = Bs[row * BN + tc + v * tcols];
#pragma unroll
            for (int u = 0; u < TM; ++u)
#pragma unroll
                for (int v = 0; v < TN; ++v) acc[u][v] += a[u] * b[v];
        }
        __syncthreads();
    }

#pragma unroll
    for (int v = 0; v < TN; ++v) {
        int j = j0 + tc + v * tcols;
        if (j >= J) continue;
        int n = j / HWout, pix = j - n * HWout;
#pragma unroll
        for (int u = 0; u < TM; ++u) {
            int m = m0 + tr * TM + u;
            if (m < M) dst[n * d.dst_sn + (g * M + m) * d.dst_sc + pix] = acc[u][v];
        }
    }
}

// y = conv(x, W). BM: rows of the output tile (see the header); (xsn, xsc)
// and (ysn, ysc): the image and channel strides of x and y.
extern "C" __global__ void __launch_bounds__(CONV_THREADS)
grouped_conv2d_fwd(const real* __restrict__ x, const real* __restrict__ W, real* __restrict__ y,
                   int N, int C, int H, int Wd, int K, int P, int Q, int G, int R, int S,
                   int sh, int sw, int ph, int pw, int BM, int xsn, int xsc, int ysn, int ysc) {
    ConvShape d = {N, C, H, Wd, K, P, Q, G, R, S, sh, sw, ph, pw, xsn, xsc, ysn, ysc};
    conv_gemm<false>(x, W, y, d, BM);
}

// gx = the gradient of conv(x, W) with respect to x, given gy.
extern "C" __global__ void __launch_bounds__(CONV_THREADS)
grouped_conv2d_bwd_data(const real* __restrict__ gy, const real* __restrict__ W,
                        real* __restrict__ gx, int N, int C, int H, int Wd, int K, int P, int Q,
                        int G, int R, int S, int sh, int sw, int ph, int pw, int BM,
                        int gysn, int gysc, int gxsn, int gxsc) {
    ConvShape d = {N, C, H, Wd, K, P, Q, G, R, S, sh, sw, ph, pw, gysn, gysc, gxsn, gxsc};
    conv_gemm<true>(gy, W, gx, d, BM);
}
