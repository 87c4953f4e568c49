"""The GPU side: this project's CUDA C kernels (``kernels/*.cu``) and how they run.

    device.py       where a launch goes: the GPU (NVRTC through CuPy, modules
                    compiled once and memoized) or the CPU emulator; LAUNCH
                    shapes, compile defines, argument checks
    emulator.py     the CPU emulator, one more device beside CuPy's: g++
                    compiles the same .cu source, threads run as fibers, every
                    access is checked (memcheck, racecheck, initcheck, synccheck)
    emulator_source.py  how a .cu file is rewritten for it (checked pointers)
    conv.py         launchers of grouped_conv.cu and grouped_conv_bwd_weight.cu
    norm.py         launchers of batch_norm.cu
    pool.py         launchers of max_pool.cu
    loss.py         launchers of softmax_cross_entropy.cu
    elementwise.py  launchers of add_relu.cu (residual add + ReLU)
    sgd.py          launcher of sgd.cu

Every launcher imports without a GPU. The ops in ``minitorch_gx.ops`` import
the launchers they call, so ``ops/conv.py: Conv2d.backward`` leads straight to
``cuda/conv.py: conv2d_backward_data``, which names its file and kernel.
"""
