#!/usr/bin/env python3
"""Time torchvision's ImageNet input pipeline on an ILSVRC2012-layout folder.

This is the counterpart of `ldnc data bench imagenet:DIR`, run with the same
folder, batch size, number of batches and worker count. Training reads
`DIR/train` through ImageFolder (Pillow decoding), RandomResizedCrop(224),
RandomHorizontalFlip, ToTensor and Normalize. `--eval` reads `DIR/val`
through Resize(256), CenterCrop(224), ToTensor and Normalize. A DataLoader with
`--workers` worker processes batches the images, dropping the last partial
batch in training as ldnc does.

Throughput is images delivered per second of wall time, from creating the
loader's iterator (which starts the workers) to receiving the last batch. CPU
time is the user plus system time of this process and of its worker
processes, read after the workers have exited, so it includes any batch the
workers prepared but the loop never took.

Usage:
    python3 bench/imagenet_pipeline_torchvision.py DIR [--workers N] [--batches B]
        [--batch-size S] [--eval] [--json]
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

# The ImageNet channel statistics that ldnc also normalizes by (IMAGENET_MEAN, IMAGENET_STD).
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def cpu_seconds():
    """Return the user plus system CPU time of this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_loader(args):
    """Return the split name, the dataset and the DataLoader that the arguments select."""
    normalize = transforms.Normalize(mean=MEAN, std=STD)
    if args.eval:
        split = "val"
        transform = transforms.Compose([
            transforms.Resize(args.resize),
            transforms.CenterCrop(args.input_size),
            transforms.ToTensor(),
            normalize,
        ])
    else:
        split = "train"
        transform = transforms.Compose([
            transforms.RandomResizedCrop(args.input_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ])
    dataset = datasets.ImageFolder(os.path.join(args.dir, split), transform)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=not args.eval,
        num_workers=args.workers,
        drop_last=not args.eval,
    )
    return split, dataset, loader


def run(args):
    torch.manual_seed(args.seed)
    split, dataset, loader = build_loader(args)
    per_pass = len(loader)
    if per_pass == 0:
        sys.exit(f"error: {args.dir}/{split} has {len(dataset)} images, fewer than one "
                 f"batch of {args.batch_size}; lower --batch-size")
    target = args.batches or per_pass

    show_progress = not args.json and sys.stderr.isatty()
    delivered = images = 0
    shape = None
    cpu_start = cpu_seconds()
    started = time.perf_counter()
    while delivered < target:
        iterator = iter(loader)
        for batch, _labels in iterator:
            shape = list(batch.shape[1:])
            images += batch.shape[0]
            delivered += 1
            if show_progress:
                rate = images / (time.perf_counter() - started)
                print(f"\r{delivered}/{target} batches {rate:.0f} images/s",
                      end="", file=sys.stderr, flush=True)
            if delivered == target:
                break
        # Deleting the iterator stops and joins the worker processes.
        del iterator
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_start
    if show_progress:
        print("\r", end="", file=sys.stderr)

    workers = max(args.workers, 1)
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "split": split,
        "workers": args.workers,
        "available_cores": os.cpu_count(),
        "batch_size": args.batch_size,
        "batches": delivered,
        "images": images,
        "image_shape": shape,
        "seconds": seconds,
        "images_per_second": images / seconds,
        "images_per_second_per_worker": images / seconds / workers,
        "cpu_seconds": cpu,
        "images_per_cpu_second": images / cpu if cpu > 0 else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="folder with train/<class>/ and val/<class>/")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="DataLoader worker processes (default: one per core; "
                             "0 loads in the main process)")
    parser.add_argument("--batches", type=int, default=0,
                        help="batches to time (default: one pass over the split)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--input-size", type=int, default=224, help="crop side in pixels")
    parser.add_argument("--resize", type=int, default=256,
                        help="shorter side before the centre crop, with --eval")
    parser.add_argument("--eval", action="store_true",
                        help="time the evaluation transforms on val/ instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of shuffle and crops")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"torchvision {result['torchvision']} {result['split']} split "
          f"({'x'.join(map(str, result['image_shape']))} per image)")
    print(f"  batch {result['batch_size']}, {result['workers']} worker processes "
          f"({result['available_cores']} cores available)")
    print(f"  {result['images']} images in {result['batches']} batches in "
          f"{result['seconds']:.2f} s: {result['images_per_second']:.1f} images/s, "
          f"{result['images_per_second_per_worker']:.1f} images/s per worker")
    print(f"  CPU time {result['cpu_seconds']:.2f} s: "
          f"{result['images_per_cpu_second']:.1f} images per CPU-second")


if __name__ == "__main__":
    main()
