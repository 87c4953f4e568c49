// normalize.cu -- the training input on the device: the loader's uint8 images
// (N, H, W, 3) become the network's float input (N, 3, H, W) in CNHW memory
// (channel c's N*H*W values contiguous, the layout the GPU path keeps its
// activations in: see minitorch_gx/cuda/device.py),
//     x[n][c][h][w] = (img[n][h][w][c] - mean[c]) / std[c],   at (c * N + n) * H*W + h*W + w
// with mean = 255 * ImageNet's mean and std = 255 * ImageNet's std, rounded
// to REAL by the launcher exactly as the reference (resnext/transforms.py
// normalize) rounds them, so that the result is bit-identical to it: the same
// subtraction and the same IEEE division, in REAL.
//
// One pass: each pixel's 3 bytes read once, its 3 values written once. CuPy
// runs the same as 4 launches (a transposing copy, a cast, a subtraction, a
// division) with two float temporaries.
//
// Threads: blockIdx.y is the image n; a grid-stride loop over its H*W pixels
// in x, one pixel per thread per iteration (no division in the loop). Launch:
// grid (min(ceil(H*W / EW_THREADS), 65535), N), block (EW_THREADS).
// Launcher: minitorch_gx/cuda/normalize.py normalize_images, called by
// resnext/transforms.py normalize; tested against its reference
// (tests/resnext/test_transforms.py).

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef EW_THREADS
#define EW_THREADS 256
#endif

extern "C" __global__ void __launch_bounds__(EW_THREADS)
normalize_u8_nhwc(const unsigned char* __restrict__ img, real* __restrict__ x, real mean0,
                  real mean1, real mean2, real std0, real std1, real std2, long long hw) {
    const long long n = blockIdx.y, plane = (long long)gridDim.y * hw;  // N * H*W
    const unsigned char* in = img + n * hw * 3;
    real* out = x + n * hw;  // channel 0 of image n; channel c is c * plane further
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < hw;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = ((real)in[3 * i] - mean0) / std0;
        out[plane + i] = ((real)in[3 * i + 1] - mean1) / std1;
        out[2 * plane + i] = ((real)in[3 * i + 2] - mean2) / std2;
    }
}
