// add_relu.cu -- the end of every ResNeXt bottleneck, y = max(a + b, 0) (the
// residual add and its ReLU), in one pass, and its backward.
//
// Legend: a, b, y, gy, gx: n elements (any shape, contiguous).
//   forward:  y = max(a + b, 0)
//   backward: gx = gy where y > 0, else 0  (the gradient of both a and b)
//   add:      y = a + b  (backward's sum of the two gradients of a tensor that
//             feeds two consumers: the input of every bottleneck)
// CuPy would write a + b to a temporary and read it back for the maximum: two
// passes and an extra array; here each element is read and written once.
//
// Threads: grid-stride loop, one element per thread per iteration. Launch:
// grid (min(ceil(n / EW_THREADS), 65535)), block (EW_THREADS, or fewer).
// Launchers: minitorch_gx/cuda/elementwise.py add_relu_forward / relu_backward, called by
// ops/basic.py AddReLU (the residual join of resnext/model.py Bottleneck), and add, called
// by ops/basic.py add_gradients (the engine's accumulation, autograd.py). Tested against
// ops/basic.py add_relu_forward_reference / relu_backward_reference, add against NumPy's
// sum (tests/ops/test_basic.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef EW_THREADS
#define EW_THREADS 256
#endif

extern "C" __global__ void __launch_bounds__(EW_THREADS)
add_relu_fwd(const real* __restrict__ a, const real* __restrict__ b, real* __restrict__ y,
             long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        real v = a[i] + b[i];
        y[i] = v > 0 ? v : 0;
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
relu_bwd(const real* __restrict__ gy, const real* __restrict__ y, real* __restrict__ gx,
         long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        gx[i] = y[i] > 0 ? gy[i] : 0;
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
add_arrays(const real* __restrict__ a, const real* __restrict__ b, real* __restrict__ y,
           long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}
