"""Time one SGD training step of PyTorch's DenseNet-BC on CIFAR-shaped data.

The network matches examples/densenet-bc-100.ron with `blocks=[n, n, n]`.
It has a 3x3 stem conv to 2 * growth channels and three dense blocks of n
bottleneck layers (BN-ReLU-1x1 conv to 4 * growth, BN-ReLU-3x3 conv to
growth). Classic transitions (BN-ReLU-1x1 conv with compression 0.5, then
2x2 average pooling) join the blocks, and a BN-ReLU-global-pool-linear head
ends the network. With --checkpoint, each layer's
concat-BN-ReLU-1x1 conv runs under torch.utils.checkpoint, as the
memory-efficient DenseNet implementation does, so its output is recomputed in
the backward pass instead of stored.

Prints images/s over the timed steps (after one warm-up step), the parameter
count and the process's peak resident memory, which includes what
`import torch` takes.

    python3 bench/densenet_pytorch.py --layers 16 --batch 64 [--checkpoint] [--json]
"""

import argparse
import json
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp


class Bottleneck(nn.Module):
    def __init__(self, channels, growth, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def bottleneck(self, *inputs):
        return self.conv1(F.relu(self.norm1(torch.cat(inputs, 1))))

    def forward(self, inputs):
        if self.checkpoint and any(x.requires_grad for x in inputs):
            out = cp.checkpoint(self.bottleneck, *inputs, use_reentrant=False)
        else:
            out = self.bottleneck(*inputs)
        return self.conv2(F.relu(self.norm2(out)))


class Block(nn.Module):
    def __init__(self, layers, channels, growth, checkpoint):
        super().__init__()
        self.layers = nn.ModuleList(
            Bottleneck(channels + i * growth, growth, checkpoint) for i in range(layers)
        )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    def __init__(self, channels, out):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, out, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNetBC(nn.Module):
    def __init__(self, layers, growth=12, classes=10, checkpoint=False):
        super().__init__()
        channels = 2 * growth
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages = []
        for block in range(3):
            stages.append(Block(layers, channels, growth, checkpoint))
            channels += layers * growth
            if block < 2:
                out = channels // 2
                stages.append(Transition(channels, out))
                channels = out
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = F.relu(self.norm(self.stages(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="bottleneck layers per block (n)")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--checkpoint", action="store_true",
                        help="recompute each layer's bottleneck input in the backward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = DenseNetBC(args.layers, checkpoint=args.checkpoint)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - started) / args.steps
    result = {
        "variant": "checkpointed" if args.checkpoint else "plain",
        "layers_per_block": args.layers,
        "batch": args.batch,
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds_per_step": seconds,
        "images_per_second": args.batch / seconds,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"PyTorch DenseNet-BC ({result['variant']}), n = {args.layers}, batch {args.batch}, "
            f"{args.threads} threads: {result['images_per_second']:.1f} images/s, "
            f"{result['parameters']} parameters, peak RSS {result['peak_rss_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
