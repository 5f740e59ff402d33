"""Write small WebDataset shards in the img2dataset / LAION layout, offline.

Each sample is KEY.jpg + KEY.txt + KEY.json. By default the images are random crops
of real photos that ship with scikit-image (no download), so tests and smoke runs
see natural-image statistics and non-square sizes.

    python tools/make_shards.py --output_dir /tmp/shards [--num_shards 4] [--samples_per_shard 16]
        [--image_dir DIR] [--seed 0] [--min_size 96] [--max_size 320]
"""

import argparse
import hashlib
import io
import json
import math
import os
import random
import tarfile

from PIL import Image

# skimage.data photos that are inside the wheel (lily, eagle, skin... need pooch
# downloads and are left out). Synthetic images, masks and tiny crops are skipped too.
SKIMAGE_PHOTOS = {
    "astronaut": ("a smiling astronaut in an orange spacesuit next to a flag", "portrait of an astronaut holding a helmet"),
    "chelsea": ("a tabby cat looking at the camera", "close up of a ginger cat with green eyes"),
    "coffee": ("a cup of coffee on a red saucer on a wooden table", "an espresso cup with a spoon"),
    "rocket": ("a rocket on a launch pad at dusk", "a rocket between launch towers at night"),
    "stereo_motorcycle": ("a red motorcycle parked in a garage", "a motorbike in a workshop with shelves"),
    "camera": ("a black and white photo of a man filming with a camera on a tripod", "a cameraman in a park"),
    "grass": ("a black and white close up of grass", "grass texture"),
    "gravel": ("a black and white photo of gravel", "small stones on the ground"),
    "brick": ("a brick wall seen at an angle", "black and white brick texture"),
    "hubble_deep_field": ("thousands of colorful galaxies in deep space", "the hubble deep field"),
    "immunohistochemistry": ("a microscope image of stained tissue in brown and blue", "histology slide"),
    "retina": ("a photograph of the retina of an eye", "a red fundus image with blood vessels"),
    "coins": ("rows of old silver coins on a black background", "ancient greek coins"),
    "moon": ("the cratered surface of the moon", "a black and white photo of the lunar surface"),
    "page": ("a scanned page of a book with printed text", "a page of text about image segmentation"),
    "text": ("handwritten equations on a stone floor", "chalk writing on the ground"),
    "clock": ("a blurry photo of a clock in motion", "motion blur of a round clock"),
    "cell": ("a microscope image of a single round cell", "a bright cell on a gray background"),
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def load_sources(image_dir=None):
    """Return [(RGB PIL image, captions tuple, url)]."""
    if image_dir is None:
        import skimage.data

        sources = []
        for name, captions in SKIMAGE_PHOTOS.items():
            array = getattr(skimage.data, name)()
            if isinstance(array, tuple):  # stereo_motorcycle -> (left, right, disparity)
                array = array[0]
            sources.append((Image.fromarray(array).convert("RGB"), captions, f"file://skimage.data/{name}"))
        return sources

    sources = []
    for fname in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(fname)
        if ext.lower() not in IMAGE_EXTS:
            continue
        path = os.path.join(image_dir, fname)
        caption_path = os.path.join(image_dir, stem + ".txt")
        caption = stem
        if os.path.isfile(caption_path):
            with open(caption_path, encoding="utf-8") as f:
                caption = f.read().strip() or stem
        with Image.open(path) as im:
            sources.append((im.convert("RGB"), (caption,), "file://" + os.path.abspath(path)))
    if not sources:
        raise ValueError(f"no images found in {image_dir}")
    return sources


def random_sample(rng, source, min_size, max_size):
    image, captions, url = source
    src_w, src_h = image.size
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))  # width / height
    # Largest crop of that aspect ratio, then shrink it by a random area factor.
    max_w, max_h = (src_h * aspect, src_h) if src_w / src_h > aspect else (src_w, src_w / aspect)
    scale = math.sqrt(rng.uniform(0.2, 1.0))
    crop_w, crop_h = max(1, int(max_w * scale)), max(1, int(max_h * scale))
    x0, y0 = rng.randint(0, src_w - crop_w), rng.randint(0, src_h - crop_h)

    short = rng.randint(min_size, max_size)
    if crop_w <= crop_h:
        size = (short, round(short * crop_h / crop_w))
    else:
        size = (round(short * crop_w / crop_h), short)
    out = image.resize(size, Image.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out, rng.choice(captions), url, (src_w, src_h)


def _add(tar, name, data):
    # Fixed metadata so the same seed gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(output_dir, num_shards=4, samples_per_shard=16, seed=0, image_dir=None, min_size=96, max_size=320):
    """Write {output_dir}/00000.tar ... and return their paths."""
    if not 0 < samples_per_shard <= 10000:
        raise ValueError("samples_per_shard must be in 1..10000 (keys are shard * 10000 + i)")
    if not 0 < min_size <= max_size:
        raise ValueError("need 0 < min_size <= max_size")
    os.makedirs(output_dir, exist_ok=True)
    sources = load_sources(image_dir)
    rng = random.Random(seed)

    paths = []
    for shard in range(num_shards):
        path = os.path.join(output_dir, f"{shard:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(samples_per_shard):
                key = f"{shard * 10000 + i:09d}"
                image, caption, url, (orig_w, orig_h) = random_sample(rng, rng.choice(sources), min_size, max_size)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                jpg = buf.getvalue()
                meta = {
                    "key": key,
                    "caption": caption,
                    "url": url,
                    "width": image.width,
                    "height": image.height,
                    "original_width": orig_w,
                    "original_height": orig_h,
                    "status": "success",
                    "error_message": None,
                    "exif": None,
                    "sha256": hashlib.sha256(jpg).hexdigest(),
                }
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.txt", caption.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--samples_per_shard", type=int, default=16)
    parser.add_argument("--image_dir", default=None, help="folder of images with optional NAME.txt captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_size", type=int, default=96, help="min short side of a sample")
    parser.add_argument("--max_size", type=int, default=320, help="max short side of a sample")
    args = parser.parse_args()

    paths = write_shards(
        args.output_dir, args.num_shards, args.samples_per_shard, args.seed, args.image_dir, args.min_size, args.max_size
    )
    size = sum(os.path.getsize(p) for p in paths)
    spec = os.path.join(args.output_dir, f"{{00000..{len(paths) - 1:05d}}}.tar")
    print(f"wrote {len(paths) * args.samples_per_shard} samples in {len(paths)} shards ({size / 2**20:.2f} MB): {spec}")


if __name__ == "__main__":
    main()
