"""The GPU side: this project's CUDA C kernels (``kernels/*.cu``) and how they run.

    device.py       where a launch goes: the GPU (NVRTC through CuPy, modules
                    compiled once and memoized) or the CPU emulator; LAUNCH
                    shapes, compile defines, argument checks
    emulator.py     the CPU emulator, one more device beside CuPy's: g++
                    compiles the same .cu source, threads run as fibers, every
                    access is checked (memcheck, racecheck, initcheck, synccheck)
    emulator_source.py  how a .cu file is rewritten for it (checked pointers)
    conv.py         launchers of grouped_conv.cu and grouped_conv_bwd_weight.cu
    subsample.py    launchers of subsample.cu (a strided 1x1 conv's pixels)
    norm.py         launchers of batch_norm.cu
    pool.py         launchers of max_pool.cu and avg_pool.cu
    loss.py         launchers of softmax_cross_entropy.cu
    linear.py       launchers of linear.cu (the classifier's bias)
    elementwise.py  launchers of add_relu.cu (residual add + ReLU)
    normalize.py    launcher of normalize.cu (uint8 images -> the float input)
    sgd.py          launcher of sgd.cu
    prefetch.py     the next batch copied on a side stream from pinned memory
    trace.py        what a GPU step launches, traced without a GPU
    timing.py       CUDA events around each of those operations, on a GPU

Every launcher imports without a GPU. The ops in ``minitorch_gx.ops`` import
the launchers they call, so ``ops/conv.py: Conv2d.backward`` leads straight to
``cuda/conv.py: conv2d_backward_data``, which names its file and kernel.
"""
