#!/usr/bin/env python3
"""Build an ILSVRC2012-layout folder of real photographs for pipeline benchmarks.

No ImageNet is at hand, so this takes the 14 photographs below from four
packages that ship them: the jpeg-decoder 0.3.2 and image 0.24.9 crates and the
scikit-image and matplotlib wheels. It checks each against its SHA-256 and turns
each into one class: `train/<wnid>/<wnid>_<n>.JPEG` and
`val/<wnid>/<wnid>_<n>.JPEG`.

Every file is a crop of its source photograph covering 50% to 100% of the
largest crop of the target's aspect ratio. The crop is resized with Lanczos
filtering to a size drawn from common ILSVRC2012 sizes (500x375, 500x333,
375x500, 333x500, 500x500, 500x400), mirrored with probability 1/2 and
re-encoded as JPEG with quality 90 or 95 and 4:2:0 chroma subsampling. Small sources (the 320x240 cat)
are upscaled, which makes their files smoother than real photographs of that
size. One class (camera) stays grayscale, as about 2% of ILSVRC2012 does.

The class ids are `n99000001` and up, outside the WordNet 3.0 noun offsets, so
they cannot be mistaken for real synsets; `synsets.txt` maps them to sources.
The random draws are seeded, so the same Pillow version writes the same bytes.

Usage:
    python3 bench/make_imagenet_photos.py [OUT_DIR] [--train N] [--val N]

OUT_DIR defaults to target/imagenet-photos. Needs Pillow, pip (to download the
two wheels into OUT_DIR/.sources) and cargo (to download the two crates through
a throwaway manifest in OUT_DIR/.sources/crates).
"""

import argparse
import hashlib
import io
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image, __version__ as pillow_version

REPO = Path(__file__).resolve().parent.parent

# (class name, package kind, package, version, path inside the package, SHA-256)
SOURCES = [
    ("hibiscus", "crate", "jpeg-decoder", "0.3.2", "benches/large_image.jpg",
     "4cd902020e963fffd23e3a0d0be71207efe665265518fe5a3809ba77699a5fd0"),
    ("eiffel_tower", "crate", "jpeg-decoder", "0.3.2", "benches/tower.jpg",
     "40b5ae0df66540ba3ac60edf2840b4b8edd0500706105f3b63083e3a8993119a"),
    ("tabby_cat", "crate", "image", "0.24.9", "tests/images/jpg/progressive/cat.jpg",
     "f8dcbaf051bfb52ea7a9481cbe3b125210c236518762b0be65444bfc073792db"),
    ("waterfront", "crate", "image", "0.24.9", "examples/scaledown/test.jpg",
     "8ee18f55a06b4b4a05d9696bbd6d1ff4511a103f271817a1dcd9808243aa663c"),
    ("astronaut", "wheel", "scikit-image", "0.26.0", "skimage/data/astronaut.png",
     "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    ("chelsea_cat", "wheel", "scikit-image", "0.26.0", "skimage/data/chelsea.png",
     "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    ("coffee", "wheel", "scikit-image", "0.26.0", "skimage/data/coffee.png",
     "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    ("motorcycle", "wheel", "scikit-image", "0.26.0", "skimage/data/motorcycle_left.png",
     "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179"),
    ("rocket", "wheel", "scikit-image", "0.26.0", "skimage/data/rocket.jpg",
     "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
    ("tissue_stain", "wheel", "scikit-image", "0.26.0", "skimage/data/ihc.png",
     "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef"),
    ("deep_field", "wheel", "scikit-image", "0.26.0", "skimage/data/hubble_deep_field.jpg",
     "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    ("retina", "wheel", "scikit-image", "0.26.0", "skimage/data/retina.jpg",
     "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"),
    ("camera", "wheel", "scikit-image", "0.26.0", "skimage/data/camera.png",
     "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
    ("grace_hopper", "wheel", "matplotlib", "3.11.2",
     "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
     "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
]

# (width, height) of typical ILSVRC2012 images, most of which are 500 pixels
# on the longer side.
SIZES = [(500, 375), (500, 333), (375, 500), (333, 500), (500, 500), (500, 400)]
QUALITIES = [90, 95]


CRATES_MANIFEST = """\
[package]
name = "imagenet-photo-sources"
version = "0.0.0"
edition = "2021"
publish = false

# Its own workspace, so cargo does not attach it to the ldnc workspace above.
[workspace]

[dependencies]
{dependencies}
"""


def crate_dirs(cache):
    """Map (crate, version) to its source folder for every crate that SOURCES names.

    ldnc does not depend on these crate versions, so a throwaway package in
    `cache/crates` pins them and `cargo metadata` downloads and lists them.
    """
    pinned = sorted({(package, version) for _, kind, package, version, _, _ in SOURCES
                     if kind == "crate"})
    dependencies = "\n".join(
        f'{package} = {{ version = "={version}", default-features = false }}'
        for package, version in pinned
    )
    folder = cache / "crates"
    (folder / "src").mkdir(parents=True, exist_ok=True)
    (folder / "src" / "lib.rs").write_text("")
    (folder / "Cargo.toml").write_text(CRATES_MANIFEST.format(dependencies=dependencies))
    output = subprocess.run(
        ["cargo", "metadata", "--format-version", "1",
         "--manifest-path", str(folder / "Cargo.toml")],
        check=True, capture_output=True, text=True,
    ).stdout
    return {
        (package["name"], package["version"]): Path(package["manifest_path"]).parent
        for package in json.loads(output)["packages"]
    }


def wheel_path(cache, package, version):
    """Download the wheel of `package==version` into `cache` once and return its path."""
    prefix = package.replace("-", "_") + "-" + version + "-"
    found = sorted(cache.glob(prefix + "*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary", ":all:", f"{package}=={version}", "-d", str(cache)],
            check=True,
        )
        found = sorted(cache.glob(prefix + "*.whl"))
    if not found:
        sys.exit(f"error: pip did not download a wheel of {package}=={version} into {cache}")
    return found[0]


def read_sources(cache):
    """Return (class name, source label, photo bytes) for every entry of SOURCES."""
    crates = None
    photos = []
    for name, kind, package, version, inner, sha256 in SOURCES:
        if kind == "crate":
            if crates is None:
                crates = crate_dirs(cache)
            folder = crates.get((package, version))
            if folder is None:
                sys.exit(f"error: cargo metadata lists no {package} {version} "
                         f"for the manifest in {cache / 'crates'}")
            data = (folder / inner).read_bytes()
        else:
            with zipfile.ZipFile(wheel_path(cache, package, version)) as wheel:
                data = wheel.read(inner)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            sys.exit(f"error: {package} {version} {inner} has SHA-256 {digest}, "
                     f"expected {sha256}")
        photos.append((name, f"{kind} {package} {version}: {inner}", data))
    return photos


def variant(photo, rng):
    """Draw one crop of `photo` at an ILSVRC-like size; return (image, quality)."""
    width, height = rng.choice(SIZES)
    aspect = width / height
    # The largest crop of the target aspect ratio, then 50% to 100% of its area.
    full_w = min(photo.width, photo.height * aspect)
    scale = rng.uniform(0.5, 1.0) ** 0.5
    crop_w = max(1, round(full_w * scale))
    crop_h = max(1, round(full_w * scale / aspect))
    left = rng.randint(0, photo.width - crop_w)
    top = rng.randint(0, photo.height - crop_h)
    image = photo.crop((left, top, left + crop_w, top + crop_h))
    image = image.resize((width, height), Image.LANCZOS)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image, rng.choice(QUALITIES)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(REPO / "target" / "imagenet-photos"),
                        help="output folder (default: target/imagenet-photos)")
    parser.add_argument("--train", type=int, default=100, help="train images per class")
    parser.add_argument("--val", type=int, default=50, help="validation images per class")
    args = parser.parse_args()

    out = Path(args.out)
    cache = out / ".sources"
    cache.mkdir(parents=True, exist_ok=True)
    photos = read_sources(cache)

    lines = []
    total_bytes = 0
    for number, (name, label, data) in enumerate(photos, start=1):
        wnid = f"n{99000000 + number}"
        lines.append(f"{wnid} {name} ({label})")
        photo = Image.open(io.BytesIO(data))
        photo = photo.convert("L" if photo.mode in ("L", "I;16") else "RGB")
        for split, count in (("train", args.train), ("val", args.val)):
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(f"{wnid}/{split}")
            for index in range(1, count + 1):
                image, quality = variant(photo, rng)
                path = folder / f"{wnid}_{index}.JPEG"
                image.save(path, "JPEG", quality=quality, subsampling="4:2:0")
                total_bytes += path.stat().st_size

    (out / "synsets.txt").write_text("\n".join(lines) + "\n")
    images = len(photos) * (args.train + args.val)
    print(f"wrote {images} JPEGs ({total_bytes / 2**20:.1f} MiB) in {len(photos)} classes "
          f"to {out} with Pillow {pillow_version}")


if __name__ == "__main__":
    main()
