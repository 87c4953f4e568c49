"""minitorch_gx (a small deep-learning framework on NumPy and CuPy) and resnext
(ResNeXt50_32x4d training and evaluation built on it)."""
from setuptools import setup

setup(
    name="minitorch_gx",
    version="0.1.0",
    description="A from-scratch deep-learning framework on NumPy/CuPy, and ResNeXt50_32x4d "
                "training on ImageNet with it",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["minitorch_gx", "minitorch_gx.ops", "minitorch_gx.cuda", "minitorch_gx.distributed",
              "minitorch_gx.nn", "minitorch_gx.optim", "resnext", "minitorch_gx.kernels"],
    # The CUDA C sources live in the top-level kernels/ folder (to be read on
    # their own); installed, they travel inside the package.
    package_dir={"minitorch_gx.kernels": "kernels"},
    package_data={"minitorch_gx.kernels": ["*.cu", "*.cuh", "*.h", "emu/*.h", "emu/*.cpp"]},
    py_modules=[],
    install_requires=["numpy>=1.23", "pillow>=9", "tqdm>=4.60"],
    extras_require={
        "gpu": ["cupy-cuda13x>=13"],
        "mpi": ["mpi4py>=3.1", "mpich"],
        "test": ["pytest>=7"],
        # NVRTC alone (no GPU needed) so that CI compiles every kernel for sm_80/sm_90
        "cuda-ci": ["nvidia-cuda-nvrtc"],
        # train.py --tensorboard: an event-file writer that needs no torch or TensorFlow
        "tensorboard": ["tensorboardX>=2.6"],
    },
)
