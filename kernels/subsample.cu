// subsample.cu -- the pixels a strided 1x1 convolution reads, gathered once,
// and their gradient put back in place.
//
// Legend: planes = N * C image planes of H x W values each, one after the
// other in memory (NCHW or CNHW: both store whole planes contiguously, only
// their order differs, and the output keeps the input's order); stride
// (sh, sw); P = ceil(H / sh), Q = ceil(W / sw) kept rows and columns.
//   gather:  xs[plane, p, q] = x[plane, p * sh, q * sw]
//   scatter: gx[plane, h, w] = gxs[plane, h / sh, w / sw] where sh divides h
//            and sw divides w, else 0 (the adjoint of gather)
//   add_scattered: out = a + scatter(gxs), the same pass with a read beside
//            it: how the strided gradient joins the other gradient of its
//            input (a ResNeXt block's input feeds conv1 and the downsample),
//            with no zero-filled full-size array in between
// A 1x1 convolution with stride (sh, sw) is then a stride-1 one on xs: a
// single GEMM over N*P*Q pixels, forward and for both gradients
// (minitorch_gx/ops/conv.py Conv2d). The scatter writes every element of gx
// exactly once, values and zeros together: one pass, no fill before it; and
// the engine usually needs only add_scattered (minitorch_gx/autograd.py
// LazyGradient), which replaces a scatter and an add.
//
// Threads: one warp per output row, its lanes along the row; a grid-stride
// loop over rows. A row's (plane, row) is found with one division per row;
// no division inside a row. Launch: grid (min(ceil(rows / warps per block),
// 65535)), block (EW_THREADS, a multiple of 32).
// Launchers: minitorch_gx/cuda/subsample.py gather_pixels / scatter_pixels /
// add_scattered, called by ops/conv.py (_every_other_pixel, _StridedGradient); tested
// against NumPy's strided slicing (tests/cuda/test_small_kernels.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef EW_THREADS
#define EW_THREADS 256
#endif

extern "C" __global__ void __launch_bounds__(EW_THREADS)
gather_pixels(const real* __restrict__ x, real* __restrict__ xs, int planes, int H, int W,
              int P, int Q, int sh, int sw) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int rows = planes * P;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const int plane = row / P, p = row - plane * P;
        const real* src = x + ((long long)plane * H + (long long)p * sh) * W;
        real* dst = xs + (long long)row * Q;
        for (int q = lane; q < Q; q += 32) dst[q] = src[q * sw];
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
scatter_pixels(const real* __restrict__ gxs, real* __restrict__ gx, int planes, int H, int W,
               int P, int Q, int sh, int sw) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int rows = planes * H;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const int plane = row / H, h = row - plane * H, p = h / sh;
        real* dst = gx + (long long)row * W;
        if (h != p * sh || p >= P) {  // a row the forward skipped: all zeros
            for (int w = lane; w < W; w += 32) dst[w] = 0;
            continue;
        }
        const real* src = gxs + ((long long)plane * P + p) * Q;
        for (int q = lane; q < Q; q += 32) {  // column q * sw, then the sw - 1 it skipped
            const int w = q * sw;
            dst[w] = src[q];
            for (int j = 1; j < sw && w + j < W; ++j) dst[w + j] = 0;
        }
        for (int w = Q * sw + lane; w < W; w += 32) dst[w] = 0;
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
add_scattered(const real* __restrict__ a, const real* __restrict__ gxs, real* __restrict__ out,
              int planes, int H, int W, int P, int Q, int sh, int sw) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int rows = planes * H;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const int plane = row / H, h = row - plane * H, p = h / sh;
        const real* in = a + (long long)row * W;
        real* dst = out + (long long)row * W;
        if (h != p * sh || p >= P) {  // a row the forward skipped: a alone
            for (int w = lane; w < W; w += 32) dst[w] = in[w];
            continue;
        }
        const real* src = gxs + ((long long)plane * P + p) * Q;
        for (int q = lane; q < Q; q += 32) {
            const int w = q * sw;
            dst[w] = in[w] + src[q];
            for (int j = 1; j < sw && w + j < W; ++j) dst[w + j] = in[w + j];
        }
        for (int w = Q * sw + lane; w < W; w += 32) dst[w] = in[w];
    }
}
