"""Remake the two small validation conditioning images in the repo root, offline.

There is no dog or office photo among scikit-image's bundled photos, so these are
the closest stand-ins; they are 64x64 RGB low-resolution photos, which is what a
tile ControlNet is conditioned on.

    python tools/make_conditioning_images.py [--output_dir REPO_ROOT]
"""

import argparse
import os

import numpy as np
from PIL import Image

SIZE = 64
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dog_on_grass():
    """'a dog sitting on the grass': skimage chelsea (a tabby cat) peeking over skimage grass."""
    import skimage.data

    gray = skimage.data.grass().astype(np.float32) / 255
    # The grass photo is grayscale; tint it green so the scene reads as a lawn.
    green = np.stack([0.35 * gray + 0.05, 0.7 * gray + 0.15, 0.2 * gray + 0.03], axis=-1)
    canvas = np.asarray(Image.fromarray((green * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.LANCZOS), np.float32)

    animal_h = SIZE * 3 // 4
    animal = Image.fromarray(skimage.data.chelsea()).resize((SIZE * 9 // 8, animal_h), Image.LANCZOS)
    left = (animal.width - SIZE) // 2
    animal = np.asarray(animal.crop((left, 0, left + SIZE, animal_h)), np.float32)

    # Wavy, grass-textured horizon so the blades overlap the animal's chin.
    x = np.arange(SIZE)
    horizon = SIZE * 5 / 8 + 2 * np.sin(x / 7.0) + (gray[200, : SIZE * 8 : 8] - 0.5) * 6
    alpha = np.clip((horizon[None, :] - np.arange(animal_h)[:, None]) / 2.5, 0, 1)[..., None]
    canvas[:animal_h] = animal * alpha + canvas[:animal_h] * (1 - alpha)
    return Image.fromarray(canvas.round().astype(np.uint8)), "skimage.data.chelsea (cat) over skimage.data.grass (tinted green)"


def home_office():
    """'home office': skimage coffee, a cup on a wooden table, center-cropped."""
    import skimage.data

    image = Image.fromarray(skimage.data.coffee())
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)
    return image.resize((SIZE, SIZE), Image.LANCZOS, box=box), "skimage.data.coffee (cup on a wooden table)"


def make_images(output_dir=REPO_ROOT):
    outputs = []
    for (image, source), name, prompt in (
        (dog_on_grass(), "conditioning_image_1.png", "a dog sitting on the grass"),
        (home_office(), "conditioning_image_2.jpeg", "home office"),
    ):
        path = os.path.join(output_dir, name)
        if name.endswith(".png"):
            image.save(path, optimize=True)
        else:
            image.save(path, quality=90)
        outputs.append((path, prompt, source))
    return outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=REPO_ROOT)
    args = parser.parse_args()
    for path, prompt, source in make_images(args.output_dir):
        print(f"{path} ({os.path.getsize(path)} bytes) for {prompt!r}: {source}")


if __name__ == "__main__":
    main()
