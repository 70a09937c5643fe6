"""The BCCD Dataset for PyTorch, or any VOC dataset's lists (tutorial, "PyTorch Dataset" and "PyTorch DataLoader").

    from datasets import BCCDDataset, AugmentationSampler, EpochBatches
    train_set = BCCDDataset("data/lists", "train")
    loader = DataLoader(train_set, batch_size=8, sampler=AugmentationSampler(train_set, seed=0),
                        collate_fn=BCCDDataset.collate_fn, num_workers=4)  # call set_epoch before each epoch

    # or all epochs as one stream, which the workers never stop preparing (train.py)
    batches = EpochBatches(AugmentationSampler(train_set, seed=0), 8, drop_last=True, epochs=range(0, 100))
    loader = DataLoader(train_set, batch_sampler=batches, collate_fn=BCCDDataset.collate_fn, num_workers=4)

The lists come from create_data_lists.py.
"""
import itertools
import json
import os

import torch
from PIL import Image
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from misc import UserError
from utils import check_label_map, load_image, transform, upright_size


MAX_COORDINATE = 1e6  # pixels: boxes of create_data_lists.py lie in their image, and no image is a million pixels wide


class BCCDDataset(Dataset):
    """BCCD images (or another VOC dataset's) with their boxes, labels and difficulties, transformed as the
    tutorial does.

    Args:
        data_folder: folder with the JSON lists written by create_data_lists.py; its label_map.json,
            {"background": 0, class name: label, ...}, becomes self.label_map.
        split: 'train' or 'test', in any case. TRAIN is augmented (see utils.transform).
        keep_difficult: keep objects marked difficult (BCCD has none; VOC-style data may).
        cache_images: decode every image once, here, and keep it in memory (BCCD's 292 train
            images take 270 MB). DataLoader workers started after that share the cache.
        max_zoom, flips, crop_keep: TRAIN's zoom-out, flips and the boxes its crops keep (utils.transform).

    Item i is (image (3, 300, 300) uint8, to be normalized on the device with utils.normalize;
    boxes (n, 4) float, fractional (x_min, y_min, x_max, y_max); labels (n,) long; difficulties
    (n,) uint8).
    An index may also be a pair (i, seed): the augmentation then draws from a generator seeded
    with `seed`, so it does not depend on which worker loads the item (see AugmentationSampler).
    """

    def __init__(self, data_folder, split, keep_difficult=False, cache_images=False, max_zoom=4., flips="h",
                 crop_keep="centre"):
        self.split = split.upper()
        if self.split not in ("TRAIN", "TEST"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.data_folder = data_folder
        self.keep_difficult = keep_difficult
        self.max_zoom = max_zoom
        self.flips, self.crop_keep = flips, crop_keep
        label_map_path = os.path.join(data_folder, "label_map.json")
        self.label_map = check_label_map(self._read_json(label_map_path), label_map_path)
        self.images = self._read_json(os.path.join(data_folder, self.split + "_images.json"))
        self.objects = self._read_json(os.path.join(data_folder, self.split + "_objects.json"))
        if not isinstance(self.images, list) or not all(isinstance(p, str) for p in self.images):
            raise UserError(f"{os.path.join(data_folder, self.split + '_images.json')}: not a list of image paths; run "
                            f"create_data_lists.py again")
        if not isinstance(self.objects, list) or len(self.images) != len(self.objects):
            raise UserError(f"{data_folder}: {self.split}_images.json has {len(self.images)} entries but "
                            f"{self.split}_objects.json has {len(self.objects) if isinstance(self.objects, list) else 'no list of'}"
                            f"; run create_data_lists.py again")
        if not self.images:
            raise UserError(f"{os.path.join(data_folder, self.split + '_images.json')}: no images; make lists of a "
                            f"split that has some (create_data_lists.py)")
        for i, objects in enumerate(self.objects):
            self._check_entry(i, objects)
        missing = next((p for p in self.images if not os.path.isfile(p)), None)  # found now, not in the middle of a run
        if missing is not None:
            raise UserError(f"{missing}: image of {self.split}_images.json " + (
                "not a regular file (a pipe, socket or device)" if os.path.exists(missing) else
                "not found (moved or deleted?)") + "; run create_data_lists.py again")
        seen = {}
        for p in self.images:  # counted twice in a TEST's mAP, trained on twice as often
            if seen.setdefault(os.path.realpath(p), p) is not p:
                raise UserError(f"{os.path.join(data_folder, self.split + '_images.json')}: {p} is listed twice (as "
                                f"{seen[os.path.realpath(p)]} too); run create_data_lists.py again")
        self._cache = None
        if cache_images:
            self.cache()

    def cache(self):
        """Decode every image now and keep it in memory; DataLoader workers started after that share the cache."""
        self._cache = [load_image(path) for path in self.images]

    def _check_entry(self, i, objects):
        """An entry of the objects list as create_data_lists writes it, else a UserError naming the file and entry:
        a damaged or hand-edited list fails here, in one line, not later in a DataLoader worker or as a nan loss."""
        path = os.path.join(self.data_folder, self.split + "_objects.json")
        where = f"{path}: entry {i} ({os.path.basename(self.images[i])})"
        try:
            boxes, labels, difficulties = objects["boxes"], objects["labels"], objects["difficulties"]
            ok = (len(boxes) == len(labels) == len(difficulties)
                  and all(isinstance(l, int) and not isinstance(l, bool) for l in labels + difficulties)
                  and not any(isinstance(v, bool) for box in boxes for v in box))  # true is not a coordinate
            boxes = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4) if ok else None
            ok = ok and len(objects["boxes"]) == len(boxes)  # each box four numbers
        except (KeyError, TypeError, ValueError, RuntimeError):
            ok = False
        if not ok:
            raise UserError(f"{where}: not {{'boxes': [[x_min, y_min, x_max, y_max], ...], 'labels': [int, ...], "
                            f"'difficulties': [0 or 1, ...]}}; run create_data_lists.py again")
        if not (boxes.abs() < MAX_COORDINATE).all() or (boxes[:, 2:] <= boxes[:, :2]).any() or (boxes < 0).any():
            raise UserError(f"{where}: a box is not finite, negative, beyond {MAX_COORDINATE:g} pixels or has no "
                            f"area (create_data_lists.py clips boxes to the image); run create_data_lists.py again")
        if any(d not in (0, 1) for d in difficulties):
            raise UserError(f"{where}: a 'difficult' flag other than 0 or 1; run create_data_lists.py again")
        if any(not 0 < l < len(self.label_map) for l in labels):
            raise UserError(f"{where}: a label outside 1-{len(self.label_map) - 1}, the classes of label_map.json")

    @staticmethod
    def _read_json(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: not found; make the lists with create_data_lists.py") from None
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
            raise UserError(f"{path}: unreadable ({e})") from None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        seed = None
        if isinstance(i, (tuple, list)):
            i, seed = i
        image = self._cache[i] if self._cache is not None else load_image(self.images[i])  # uint8 (3, H, W)
        objects = self.objects[i]
        boxes = torch.tensor(objects["boxes"], dtype=torch.float).reshape(-1, 4)  # (n, 4) pixels
        if ((boxes[:, 2] > image.shape[2]) | (boxes[:, 3] > image.shape[1])).any():  # a hand-edited list
            raise UserError(f"{os.path.join(self.data_folder, self.split + '_objects.json')}: entry {i} "
                            f"({os.path.basename(self.images[i])}): a box reaches beyond its {image.shape[2]}x"
                            f"{image.shape[1]} image; run create_data_lists.py again")
        labels = torch.tensor(objects["labels"], dtype=torch.long)  # (n,)
        difficulties = torch.tensor(objects["difficulties"], dtype=torch.uint8)  # (n,)
        if not self.keep_difficult:
            easy = difficulties == 0
            boxes, labels, difficulties = boxes[easy], labels[easy], difficulties[easy]
        g = torch.Generator().manual_seed(seed) if seed is not None else None  # None: the global RNG
        return transform(image, boxes, labels, difficulties, split=self.split, g=g, max_zoom=self.max_zoom,
                         flips=self.flips, crop_keep=self.crop_keep)

    @staticmethod
    def collate_fn(batch):
        """Stack the images (N, 3, 300, 300); keep boxes, labels and difficulties as lists of N tensors,
        since images hold different numbers of objects."""
        images, boxes, labels, difficulties = zip(*batch)
        return torch.stack(images), list(boxes), list(labels), list(difficulties)


def median_image_size(paths):
    """(width, height): the median width and median height of the image files (headers only are read).

    train.py records it in checkpoints as the field the model was trained on; detect.py tiles larger images."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as im:
                sizes.append(upright_size(im))
        except Exception as e:
            raise UserError(f"{path}: cannot read image ({type(e).__name__})") from None
    return tuple(torch.tensor(sizes).median(0).values.tolist())  # the lower median: a size that exists


class AugmentationSampler(Sampler):
    """Shuffles like DistributedSampler and pairs every index with a seed for its augmentation.

    The seeds are drawn from (seed, epoch, rank) alone, so the augmented batches of an epoch are
    the same whatever the number of DataLoader workers, after a resume, and with persistent
    workers; ranks of a distributed run see different shards and different augmentations.
    Call set_epoch(epoch) at the start of every epoch.

    repeats: how many times an epoch holds each image of the dataset (train.py --repeat), each time with its own
    augmentation, shuffled among the others; None: once each.
    """

    def __init__(self, dataset, seed=0, num_replicas=1, rank=0, shuffle=True, repeats=None):
        self.indices = range(len(dataset)) if repeats is None else [i for i, n in enumerate(repeats) for _ in range(n)]
        self.sampler = DistributedSampler(self.indices, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) % 2 ** 63)
        seeds = torch.randint(2 ** 62, (len(self.sampler),), generator=g).tolist()
        return iter(zip((self.indices[j] for j in self.sampler), seeds))


class EpochBatches(Sampler):
    """The batches of several epochs as one stream, for a DataLoader's batch_sampler.

    Epoch e's batches are those of a DataLoader with sampler=sampler, batch_size, drop_last after
    sampler.set_epoch(e). A DataLoader restarted every epoch begins each epoch with idle workers
    and waits for a whole batch to be prepared; with BCCD's ten batches an epoch and many workers
    that wait is a large part of the epoch. One stream lets the workers prepare the next epoch's
    first batches while the current one ends (as Detectron2's infinite TrainingSampler does).

    skip: batches of the first epoch to leave out (those an interrupted run trained before it was saved).
    """

    def __init__(self, sampler, batch_size, drop_last, epochs, skip=0):
        self.sampler, self.epochs, self.skip = sampler, epochs, skip
        self.batches = BatchSampler(sampler, batch_size, drop_last)

    def __len__(self):
        return max(len(self.epochs) * len(self.batches) - self.skip, 0)

    def __iter__(self):
        for i, epoch in enumerate(self.epochs):
            self.sampler.set_epoch(epoch)
            yield from itertools.islice(self.batches, self.skip if i == 0 else 0, None)
