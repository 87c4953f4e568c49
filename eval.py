"""Evaluate ResNeXt checkpoints (top-1 / top-5), with the original's command line.

    python3 eval.py                       # the newest demo run, on the demo's val set
    python3 eval.py --data_path=/path/to/imagenet/val --device_target="GPU" \
        --checkpoint_file_path=/path/to/checkpoint/<run dir>/ckpt_0/
    python3 eval.py --data_path=/path/to/imagenet/val --eval_resize=shorter \
        --checkpoint_file_path=resnext50_32x4d.npz   # torchvision's weights, converted

Flags: ``python3 eval.py --help`` (resnext/config.py).
"""
import sys

from resnext.evaluate import main
from resnext.runtime import main_guard

if __name__ == "__main__":
    sys.exit(main_guard(main))
