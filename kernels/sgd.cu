// sgd.cu -- one launch updates every parameter of the model: SGD with
// momentum and weight decay, PyTorch's rule (dampening 0, not Nesterov).
//
// Legend: n elements in the flat buffers p (parameters), g (gradients), buf
// (momentum); the parameters are laid out as G contiguous parameter groups,
// group i holding elements [group_end[i-1], group_end[i]) (group_end[-1] = 0)
// with its own lr[i], wd[i] (weight decay; 0 for batch-norm parameters and
// biases in the ResNeXt recipe) and momentum[i], held in the parameters' own
// type so that a float64 model is updated in float64 throughout.
//
//   d   = g + wd * p
//   buf = momentum * buf + d        (buf starts at 0, so the first step stores d)
//   p   = p - lr * buf
// With momentum 0 there is no buffer: p = p - lr * d, buf is left alone.
// skip[0] != 0 (the trainer's "a loss or gradient is not finite" flag,
// computed on the device) makes the launch change nothing: the decision to
// skip a step never needs the host to read a device value.
//
// Threads: a grid-stride loop, one element per thread per iteration; each
// element finds its group by binary search in group_end (a handful of cached
// loads). Launch: grid (min(ceil(n / SGD_THREADS), 4096)), block (SGD_THREADS, or fewer).
// Launcher: minitorch_gx/cuda/sgd.py sgd_momentum_update, called by optim/sgd.py SGD.step;
// tested against optim/sgd.py sgd_update_reference (tests/optim/test_sgd.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef SGD_THREADS
#define SGD_THREADS 256
#endif

extern "C" __global__ void __launch_bounds__(SGD_THREADS)
sgd_momentum_update(real* __restrict__ p, const real* __restrict__ g, real* __restrict__ buf,
                    const long long* __restrict__ group_end, const real* __restrict__ lr,
                    const real* __restrict__ wd, const real* __restrict__ momentum,
                    const real* __restrict__ skip, int groups, long long n) {
    if (skip[0] != 0) return;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        // the first group whose end lies past i
        int lo = 0, hi = groups - 1;
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (group_end[mid] > i) hi = mid; else lo = mid + 1;
        }
        real pv = p[i];
        real d = g[i] + wd[lo] * pv;
        real mom = momentum[lo];
        if (mom != 0) {
            d = mom * buf[i] + d;
            buf[i] = d;
        }
        p[i] = pv - lr[lo] * d;
    }
}

// The trainer's guard, before the update: how many of the n gradients (and
// the loss) are NaN or infinite, added into flag[0] (which the launcher
// zeroes). A thread counts its grid-stride share and adds its count with one
// atomicAdd, so a gradient full of NaN costs one atomic per thread, not per
// element. The count is exact up to 2^24 in float32; only "nonzero" matters.
// Launch: grid (min(ceil(n / SGD_THREADS), 4096)), block (SGD_THREADS, or fewer).
// Launcher: minitorch_gx/cuda/sgd.py count_nonfinite, called by optim/sgd.py
// SGD.nonfinite; tested against its NumPy path (tests/optim/test_sgd.py).
extern "C" __global__ void __launch_bounds__(SGD_THREADS)
count_nonfinite(const real* __restrict__ g, long long n, const real* __restrict__ loss,
                real* __restrict__ flag) {
    const long long step = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    real bad = first == 0 && !isfinite(loss[0]) ? 1 : 0;
    for (long long i = first; i < n; i += step) bad += isfinite(g[i]) ? 0 : 1;
    if (bad != 0) atomicAdd(&flag[0], bad);
}
