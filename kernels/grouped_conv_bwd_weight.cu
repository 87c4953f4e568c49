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
// very long dimension (NPQ = 128*56*56 = 401,408 pixels in layer1 at batch
// 128). Name a column of X_g^T, (c, r, s) flattened to c*RS + r*S + s, a
// "combo".
//
// Blocks and threads
//   A block owns a "piece" of gW -- one group g, BK = AGK*TK output channels,
//   NC = AGC*TX consecutive combos -- and a share of the pixels. Its threads
//   form AG = AGK*AGC groups of LANES = THREADS/AG (a multiple of 32: a warp
//   shares its channels and combos); group (ak, ac) keeps the TK x TX partial
//   sums of channels ak*TK.. and combos ac*TX.. in registers: TK = WGRAD_TK
//   (4 for groups of at most 4 output channels, else 8: a -D define from the
//   launcher) and TX = 72/TK (9: one channel's 3x3 taps; 18), 72 sums either way.
//   The pixels, flattened (n, p, q), are cut into boxes of `box` consecutive
//   pixels; box b goes to blockIdx.y = b mod splits. Per box, in shared memory:
//   - gys[j][k]: gy of the block's BK channels at the box's pixels, a row per
//     pixel (so that a thread's TK channels are vector reads), and pixoff[j],
//     where pixel j's window starts in the input tile (bytes);
//   - Xs: the input rows under the box for the channels its combos touch, as
//     in grouped_conv.cu: images stacked in "virtual rows" (Hv = (P-1)*sh + R
//     per image), so that any box needs one contiguous run of them, padding
//     included as zeros, tile_rows (from the launcher) rows per channel.
//   The threads fill both (each thread issues the loads of FILL = 8 channels
//   of a pixel or tile position before it stores them, two positions per
//   step: up to 16 independent global loads in flight), wait at a barrier,
//   and each lane walks the box's pixels
//   LANES apart: TK gy values (TK/4 vector reads) and TX inputs read from
//   shared memory, 72 multiply-adds (per 11 reads for TK = 8, 19 for TK = 4);
//   a barrier. No integer division inside a loop: positions are carried as
//   digits, stepped with carries, as in grouped_conv.cu.
//   At the end each group's 72 sums are added over its LANES lanes through
//   shared memory, SUMS = 9 combos of one channel at a time (every thread
//   stores its 9 sums, THREADS/8 threads add 8 lanes each, AG*9 threads add
//   those), and each total goes into gW with one atomicAdd (the launcher
//   zeroes gW first); the order of the splits' additions varies from run to
//   run, in the last bits only.
//   Wide images: the launcher may cut the output columns into tiles (grid z),
//   as for grouped_conv.cu, when a padded row would not fit.
//   Launch: grid (G * ceil(Kg / BK) * ceil(CgRS / NC), splits, column tiles),
//   block (WGRAD_THREADS). Launcher: minitorch_gx/cuda/conv.py
//   conv2d_backward_weight, called by ops/conv.py; tested against ops/conv.py
//   conv2d_backward_weight_reference (tests/ops/test_conv.py) and against the
//   kernel this file replaced (tests/cuda/test_grouped_conv_kernels.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef WGRAD_THREADS
#define WGRAD_THREADS 256   // a multiple of 32, at most 1024
#endif
#ifndef WGRAD_TK
#define WGRAD_TK 8          // output channels per thread: 4 or 8 (conv.py picks it)
#endif
#ifndef WGRAD_POOL_BYTES
#define WGRAD_POOL_BYTES (40 * 1024)  // gy tile and input tile, then the final sums
#endif

#define TK WGRAD_TK
#define TX (72 / TK)        // combos per thread: 72 partial sums either way
#define SUMS 9             // combos summed over the lanes per round, at the end
#define BOX_MAX 1024
#define FILL 8
#define POOL_ELEMS (WGRAD_POOL_BYTES / (int)sizeof(real))
// Two blocks per SM in float32 (at most 128 registers a thread); float64
// register tiles need more.
#define MIN_BLOCKS (sizeof(real) == 4 ? 2 : 1)

// TK values of gy are read as vectors of four; 16-byte aligned through its
// first member, so that the emulator's translation sees its name.
struct real4 {
    __align__(16) real x;
    real y, z, w;
};

// The digits (n, a, b) of i = (n*A + a)*B + b, and a step added with carries
// (the same helpers as grouped_conv.cu).
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

// The value `bytes` bytes past p. The loops keep their shared-memory offsets
// in bytes: a read is then one add (nvcc scales an element index at every read).
__device__ __forceinline__ real at_byte(const real* p, int bytes) {
    return reinterpret_cast<const real*>(reinterpret_cast<const char*>(p) + bytes)[0];
}

__device__ __forceinline__ void load_gy(real (&a)[TK], const real* p) {
#pragma unroll
    for (int q = 0; q < TK / 4; ++q) {
        const real4 w = reinterpret_cast<const real4*>(p)[q];
        a[4 * q] = w.x;
        a[4 * q + 1] = w.y;
        a[4 * q + 2] = w.z;
        a[4 * q + 3] = w.w;
    }
}

// AGK, AGC: thread groups along the output channels and the combos; box:
// pixels per box; tile_rows: virtual rows per channel of the input tile.
extern "C" __global__ void __launch_bounds__(WGRAD_THREADS, MIN_BLOCKS)
grouped_conv2d_bwd_weight(const real* __restrict__ gy, const real* __restrict__ x,
                          real* __restrict__ gW, int N, int C, int H, int Wd, int K, int P,
                          int Q, int G, int R, int S, int sh, int sw, int ph, int pw,
                          int gysn, int gysc, int xsn, int xsc, int AGK, int AGC, int box,
                          int tile_rows) {
    __shared__ __align__(16) real pool[POOL_ELEMS];  // gys, then Xs; at the end red, part
    __shared__ int pixoff[BOX_MAX];

    const int AG = AGK * AGC, lanes = WGRAD_THREADS / AG;
    if (blockDim.x != WGRAD_THREADS || AG < 1 || lanes * AG != WGRAD_THREADS || lanes % 32 ||
        box < 1 || box > BOX_MAX)
        __trap();  // the thread groups and the final sums assume these
    const int Cg = C / G, Kg = K / G, RS = R * S, CgRS = Cg * RS;
    const int BK = AGK * TK, NC = AGC * TX;  // output channels and combos of a piece
    const int ktiles = (Kg + BK - 1) / BK, ctiles = (CgRS + NC - 1) / NC;
    const int ct = blockIdx.x % ctiles, kt = blockIdx.x / ctiles % ktiles;
    const int g = blockIdx.x / (ctiles * ktiles);
    const int k0 = kt * BK, ci0 = ct * NC;
    const int cfirst = ci0 / RS, nch = (min(ci0 + NC, CgRS) - 1) / RS - cfirst + 1;

    // This column tile: output columns q0 .. q0+TQt-1; pixels (n, p, q - q0).
    const int TQ = (Q + gridDim.z - 1) / gridDim.z, q0 = blockIdx.z * TQ;
    const int TQt = min(TQ, Q - q0);
    if (TQt <= 0) return;  // (the whole block)
    const int J = N * P * TQt;
    const int Hv = (P - 1) * sh + R, TIW = (TQt - 1) * sw + S, pitch = tile_rows * TIW;
    // gys[j][k]: a row of BK channels per pixel, an odd number of 16-byte words
    // long, so that the vectors 8 lanes read or write fall in distinct banks
    const int gld = BK / 4 % 2 ? BK : BK + 4;
    const int xs_off = gld * box;  // pool: gys [box][gld], then Xs [nch][pitch]
    if (xs_off + nch * pitch > POOL_ELEMS || SUMS * WGRAD_THREADS * 9 / 8 > POOL_ELEMS) __trap();
    const real* Xs = pool + xs_off;

    const int t = threadIdx.x, grp = t / lanes, lane = t - grp * lanes;
    const int ak = grp % AGK, ac = grp / AGK;
    // Where this thread's combos ci0 + ac*TX + i read Xs, from a pixel's window
    // corner, in bytes (0 for combos past CgRS: their sums are never used).
    int xo[TX];
    {
        Digits crs = digits(ci0 + ac * TX, R, S);  // (c, r, s)
        const Digits one = {0, 0, 1};
#pragma unroll
        for (int i = 0; i < TX; ++i) {
            const int elems = (crs.n - cfirst) * pitch + crs.a * TIW + crs.b;
            xo[i] = ci0 + ac * TX + i < CgRS ? elems * (int)sizeof(real) : 0;
            advance(crs, one, R, S);
        }
    }
    real acc[TK][TX];
#pragma unroll
    for (int a = 0; a < TK; ++a)
#pragma unroll
        for (int i = 0; i < TX; ++i) acc[a][i] = 0;

    // Box b = blockIdx.y, +gridDim.y, ...: its first and last pixels as
    // digits (n, p, q), stepped from box to box.
    const int boxes = (J + box - 1) / box;
    Digits bfirst = digits(blockIdx.y * box, P, TQt);
    Digits blast = digits(blockIdx.y * box + box - 1, P, TQt);
    const Digits bstep = digits(gridDim.y * box, P, TQt);
    const Digits end = digits(J - 1, P, TQt);
    const Digits t_pix = digits(t, P, TQt), threads_pix = digits(WGRAD_THREADS, P, TQt);
    const Digits t_pos = digits(t, Hv, TIW), threads_pos = digits(WGRAD_THREADS, Hv, TIW);
    const real* gy_g = gy + (g * Kg + k0) * gysc + q0;
    const real* x_g = x + (g * Cg + cfirst) * xsc;

    for (int b = blockIdx.y; b < boxes; b += gridDim.y) {
        const int j0 = b * box, nbox = min(box, J - j0);
        Digits lastp = blast;
        if (j0 + box > J) lastp = end;
        const int vr0 = bfirst.n * Hv + bfirst.a * sh;
        const int rows = lastp.n * Hv + lastp.a * sh + R - vr0;
        if (rows > tile_rows) __trap();  // conv.py sizes tile_rows for the largest box

        // gy tile and pixel offsets (bytes): pixel jl = t, t+THREADS, ...
        Digits px = bfirst;
        advance(px, t_pix, P, TQt);
#pragma unroll 2
        for (int jl = t; jl < nbox; jl += WGRAD_THREADS) {
            pixoff[jl] = ((px.n * Hv + px.a * sh - vr0) * TIW + px.b * sw) * (int)sizeof(real);
            const int off = px.n * gysn + px.a * Q + px.b;
            for (int kk0 = 0; kk0 < BK; kk0 += FILL) {
                real v[FILL];
#pragma unroll
                for (int k = 0; k < FILL; ++k)
                    v[k] = kk0 + k < BK && k0 + kk0 + k < Kg ? gy_g[off + (kk0 + k) * gysc] : 0;
#pragma unroll
                for (int q = 0; q < FILL / 4; ++q) {
                    const real4 w = {v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]};
                    if (kk0 + 4 * q < BK) reinterpret_cast<real4*>(pool + jl * gld + kk0)[q] = w;
                }
            }
            advance(px, threads_pix, P, TQt);
        }
        // Input tile: position e is virtual position vr0*TIW + e, as digits
        // (image, virtual row, column).
        Digits pos = {bfirst.n, bfirst.a * sh, 0};
        advance(pos, t_pos, Hv, TIW);
#pragma unroll 2
        for (int e = t; e < rows * TIW; e += WGRAD_THREADS) {
            const int h = pos.a - ph, w = pos.b + q0 * sw - pw;
            const bool inside = (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)Wd;
            const int off = pos.n * xsn + h * Wd + w;
            for (int c0 = 0; c0 < nch; c0 += FILL) {
                real v[FILL];
#pragma unroll
                for (int k = 0; k < FILL; ++k)
                    v[k] = inside && c0 + k < nch ? x_g[off + (c0 + k) * xsc] : 0;
#pragma unroll
                for (int k = 0; k < FILL; ++k)
                    if (c0 + k < nch) pool[xs_off + (c0 + k) * pitch + e] = v[k];
            }
            advance(pos, threads_pos, Hv, TIW);
        }
        __syncthreads();

        for (int jl = lane; jl < nbox; jl += lanes) {
            const int o = pixoff[jl];
            real gv[TK], xv[TX];
            load_gy(gv, pool + jl * gld + ak * TK);
#pragma unroll
            for (int i = 0; i < TX; ++i) xv[i] = at_byte(Xs, o + xo[i]);
#pragma unroll
            for (int a = 0; a < TK; ++a)
#pragma unroll
                for (int i = 0; i < TX; ++i) acc[a][i] += gv[a] * xv[i];
        }
        __syncthreads();  // the next box (or the sums below) overwrites the tiles
        advance(bfirst, bstep, P, TQt);
        advance(blast, bstep, P, TQt);
    }

    // Each group's sums over its lanes, SUMS combos of one output channel a
    // at a time: red[i][t] holds thread t's sum for combo i0+i; thread pt <
    // THREADS/8 adds 8 lanes of group pt / parts (lanes pc, pc + parts, ...)
    // into part[i][pt]; thread t < AG*SUMS adds the parts of (group, combo)
    // (t / SUMS, i0 + t % SUMS) and adds the total into gW.
    real* red = pool;
    real* part = pool + SUMS * WGRAD_THREADS;  // (the pool holds both: checked above)
    const int parts = lanes / 8, nparts = WGRAD_THREADS / 8;
    const int pg = t / parts, pc = t - pg * parts;
    const int og = t / SUMS, oi = t - og * SUMS;
    const int ok = k0 + og % AGK * TK, oci = ci0 + og / AGK * TX + oi;
#pragma unroll
    for (int a = 0; a < TK; ++a) {
#pragma unroll
        for (int i0 = 0; i0 < TX; i0 += SUMS) {
#pragma unroll
            for (int i = 0; i < SUMS; ++i) red[i * WGRAD_THREADS + t] = acc[a][i0 + i];
            __syncthreads();
            if (t < nparts) {
#pragma unroll
                for (int i = 0; i < SUMS; ++i) {
                    real s = 0;
#pragma unroll
                    for (int l = 0; l < 8; ++l)
                        s += red[i * WGRAD_THREADS + pg * lanes + pc + l * parts];
                    part[i * nparts + t] = s;
                }
            }
            __syncthreads();
            if (t < AG * SUMS) {
                real s = 0;
                for (int c = 0; c < parts; ++c) s += part[oi * nparts + og * parts + c];
                if (ok + a < Kg && oci + i0 < CgRS)
                    atomicAdd(&gW[(g * Kg + ok + a) * CgRS + oci + i0], s);
            }
        }
    }
}
