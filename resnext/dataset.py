"""The ImageNet folder layout, ``root/<wnid>/*.JPEG``, and how ranks split it.

``ImageFolder(root)`` lists the class folders in sorted order (a class's index is
its position in that list, as in torchvision and MindSpore) and every image file
under each of them. ``shard(items, rank, world_size)`` gives each rank its part
of an (already shuffled) list of samples or indices.
"""
import os

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """A data folder or file that cannot be used; the message is one line naming the path."""


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class ImageFolder:
    """Samples ``(path, label)`` of a folder laid out as ``root/<class>/**/<image>``.

    classes: sorted names of the sub-folders of ``root``; ``class_to_idx`` maps
             a name to its position in that list.
    samples: list of ``(path, label)``, class by class, files in sorted order.

    Pass ``classes`` (e.g. the training set's list) to index a validation
    folder with the same mapping; a folder not in that list is an error.
    Class folders may be empty (their index is kept), but a dataset with no
    image at all is an error.
    """

    def __init__(self, root, classes=None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"dataset folder not found: {root}")
        found = sorted(e.name for e in os.scandir(root)
                       if e.is_dir() and not e.name.startswith("."))
        if not found:
            raise DataError(f"no class sub-folders in {root} (expected {root}/<class>/<image>.JPEG)")
        if classes is None:
            classes = found
        else:
            classes = list(classes)
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DataError(f"{root} has class folders not in the given class list, "
                                f"e.g. {unknown[0]!r} ({len(unknown)} in all)")
        self.root = root
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples = []
        for name in found:
            label = self.class_to_idx[name]
            for path in _list_images(os.path.join(root, name)):
                self.samples.append((path, label))
        if not self.samples:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")

    def __len__(self):
        return len(self.samples)

    def __repr__(self):
        return f"ImageFolder({self.root!r}: {len(self.samples)} images, {len(self.classes)} classes)"


def _list_images(folder):
    """Image files under ``folder`` (recursively), in a sorted, reproducible order."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # os.walk visits sub-folders in this list's order
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return paths


def shard(items, rank, world_size, drop_remainder=True):
    """The part of ``items`` that belongs to ``rank`` of ``world_size``.

    Rank r takes items r, r + world_size, r + 2 * world_size, ... (as PyTorch's
    DistributedSampler does), so the shards are disjoint.

    drop_remainder=True (training): the last ``len(items) % world_size`` items
        are dropped so that every rank gets exactly ``len(items) // world_size``
        and all ranks run the same number of steps. Because the order is
        reshuffled every epoch, a different few items sit out each epoch.
    drop_remainder=False (evaluation): nothing is dropped or duplicated; the
        shards cover every item exactly once and their sizes differ by at most 1.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    end = len(items) - len(items) % world_size if drop_remainder else len(items)
    return items[rank:end:world_size]


def shard_size(n, rank, world_size, drop_remainder=True):
    """``len(shard(range(n), rank, world_size, drop_remainder))`` without building it."""
    if drop_remainder:
        return n // world_size
    return len(range(rank, n, world_size))
