"""Train ResNeXt50_32x4d with minitorch_gx, with the original's command lines.

    python3 train.py                      # embedded demo: generated data, minutes on a CPU
    python3 train.py --run_distribute=0 --device_target="GPU" \
        --data_path=/path/to/imagenet/train --output_path /path/to/checkpoint
    mpirun -n 8 python3 train.py --run_distribute=1 --device_target="GPU" \
        --data_path=/path/to/imagenet/train --output_path /path/to/checkpoint

Flags and defaults: ``python3 train.py --help`` (resnext/config.py).
"""
import sys

from resnext.runtime import main_guard
from resnext.trainer import main

if __name__ == "__main__":
    sys.exit(main_guard(main))
