"""train.py's main under mpirun, with rank 0's BN running variance made
infinite before the epoch-2 checkpoint (as a float32 overflow leaves it).
Rank 0 must refuse to write it and every rank must stop with it, at once."""
import sys

import numpy

from resnext import trainer
from resnext.runtime import main_guard

real_end = trainer.Run._end_epoch


def poisoned_end(self, epoch_index, *args):
    if epoch_index == 1 and self.rank == 0:
        self.model.bn1.running_var[0] = numpy.inf
    return real_end(self, epoch_index, *args)


trainer.Run._end_epoch = poisoned_end
sys.exit(main_guard(lambda: trainer.main(sys.argv[1:])))
