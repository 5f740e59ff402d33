"""Write WebDataset shards (img2dataset layout) with planted faults, plus a manifest.

Tests use it to check that the trainer skips bad samples, counts them by reason and
never crashes. Written into OUTPUT_DIR:

    00000.tar      good samples interleaved with one sample per fault in FAULTS
    00001.tar      good samples, then the file cut off inside a JPEG member
    00002.tar      good samples only (clean data after the broken shards)
    (00003.tar)    never written: the spec {00000..00003} names one missing shard
    manifest.json  spec, usable_keys, skipped {key: reason}, expected_skip_counts,
                   tar_errors, missing_shards (and faults {key: fault} for debugging)

    python tools/make_faulty_shards.py --output_dir /tmp/faulty [--seed 0]
"""

import argparse
import collections
import io
import json
import os
import random
import tarfile

from PIL import Image

from make_shards import _add, load_sources, random_sample

# fault name -> skip reason the trainer must report, or None if the sample is usable.
FAULTS = {
    "truncated_jpeg": "decode_error",
    "random_bytes": "decode_error",
    "zero_byte_jpg": "empty_image",
    "grayscale_jpeg": None,
    "cmyk_jpeg": None,
    "rgba_png_as_jpg": None,
    "palette_png_as_jpg": None,
    "fully_transparent_png": None,  # the trainer must composite onto white, not show black
    "tiny_8x8": "too_small",
    "decompression_bomb": "too_large",
    "no_caption": None,
    "latin1_caption": None,
    "empty_caption": None,
    "long_caption": None,  # 600 words: the tokeniser truncates
    "extra_member": None,
    "no_image": "no_image",
}
GOOD_IN_CUT_SHARD = 4  # complete good samples of 00001.tar before the cut (brief asks >= 3)
GOOD_PER_SHARD = 8


def _encode(image, fmt="JPEG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _meta(key, caption, url, size):
    # The img2dataset fields (as make_shards writes them); size is None when there is no decodable image.
    w, h = size or (None, None)
    return {"key": key, "caption": caption, "url": url, "width": w, "height": h, "status": "success",
            "error_message": None, "exif": None}


def _good(rng, sources, key):
    """Members {ext: bytes} of a good sample: a random photo crop, 96-320 px short side."""
    image, caption, url, _ = random_sample(rng, rng.choice(sources), 96, 320)
    meta = _meta(key, caption, url, image.size)
    return {"jpg": _encode(image), "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}


def _faulty(rng, sources, key, fault):
    """Members {ext: bytes} of a sample with one planted fault (a good sample, then spoiled)."""
    image, caption, url, _ = random_sample(rng, rng.choice(sources), 96, 320)
    members = {"jpg": _encode(image), "txt": caption.encode("utf-8")}
    size = image.size
    if fault == "truncated_jpeg":  # header intact, so Image.open works and only decoding fails
        members["jpg"] = members["jpg"][: len(members["jpg"]) * 6 // 10]
    elif fault == "random_bytes":
        members["jpg"], size = rng.randbytes(4096), None
    elif fault == "zero_byte_jpg":
        members["jpg"], size = b"", None
    elif fault == "grayscale_jpeg":
        members["jpg"] = _encode(image.convert("L"))
    elif fault == "cmyk_jpeg":
        members["jpg"] = _encode(image.convert("CMYK"))
    elif fault == "rgba_png_as_jpg":  # left half opaque, right half 25% alpha
        alpha = Image.new("L", size, 64)
        alpha.paste(255, (0, 0, size[0] // 2, size[1]))
        members["jpg"] = _encode(Image.merge("RGBA", (*image.split(), alpha)), "PNG")
    elif fault == "palette_png_as_jpg":
        members["jpg"] = _encode(image.quantize(64), "PNG")
    elif fault == "fully_transparent_png":  # black under alpha 0: dropping alpha gives a black image
        members["jpg"] = _encode(Image.new("RGBA", size, (0, 0, 0, 0)), "PNG")
    elif fault == "tiny_8x8":
        members["jpg"], size = _encode(image.resize((8, 8), Image.BICUBIC)), (8, 8)
    elif fault == "decompression_bomb":
        # 100 MP > Image.MAX_IMAGE_PIXELS (~89.5 MP) but < 2x it, so PIL only warns at open
        # (no DecompressionBombError): the trainer has to check the size itself. A constant
        # palette PNG compresses to ~12 KB.
        size = (10000, 10000)
        members["jpg"] = _encode(Image.new("P", size, 0), "PNG")
    elif fault == "no_caption":
        del members["txt"]
    elif fault == "latin1_caption":
        members["txt"] = b"caf\xe9 au lait"
    elif fault == "empty_caption":
        members["txt"] = b""
    elif fault == "long_caption":
        words = caption.split()
        members["txt"] = " ".join(rng.choice(words) for _ in range(600)).encode("utf-8")
    elif fault == "extra_member":  # a member type the trainer does not expect
        members["exif"] = b"Exif\x00\x00" + rng.randbytes(64)
    elif fault == "no_image":
        del members["jpg"]
        size = None
    else:
        raise ValueError(fault)
    text = members.get("txt", b"").decode("utf-8", errors="replace")
    meta = _meta(key, text, url, size)
    meta["fault"] = fault  # extra field, only to make the shard self-describing
    members["json"] = json.dumps(meta).encode("utf-8")
    return members


def _tar_bytes(samples):
    """A USTAR tar of [(key, {ext: bytes})], members in make_shards order (jpg, txt, json, others)."""
    order = {"jpg": 0, "txt": 1, "json": 2}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members, key=lambda e: order.get(e, 3)):
                _add(tar, f"{key}.{ext}", members[ext])
    return buf.getvalue()


def write_faulty_shards(output_dir, seed=0):
    """Write the shards and manifest.json into output_dir; return the manifest dict."""
    os.makedirs(output_dir, exist_ok=True)
    sources = load_sources()
    rng = random.Random(seed)
    usable, skipped, faults = [], {}, {}

    # 00000.tar: good, fault, good, fault, ..., good (keys 0, 1, 2, ...; faults on odd keys).
    samples = []
    for i, (fault, reason) in enumerate(FAULTS.items()):
        good_key, bad_key = f"{2 * i:09d}", f"{2 * i + 1:09d}"
        samples += [(good_key, _good(rng, sources, good_key)), (bad_key, _faulty(rng, sources, bad_key, fault))]
        usable.append(good_key)
        faults[bad_key] = fault
        if reason is None:
            usable.append(bad_key)
        else:
            skipped[bad_key] = reason
    last_key = f"{2 * len(FAULTS):09d}"
    samples.append((last_key, _good(rng, sources, last_key)))
    usable.append(last_key)
    with open(os.path.join(output_dir, "00000.tar"), "wb") as f:
        f.write(_tar_bytes(samples))

    # 00001.tar: cut in the middle of the data of the first member (the jpg) of sample
    # GOOD_IN_CUT_SHARD, so the samples before it are complete and all later ones are lost.
    samples = [(f"{10000 + i:09d}", _good(rng, sources, f"{10000 + i:09d}")) for i in range(GOOD_PER_SHARD)]
    data = _tar_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmember(f"{10000 + GOOD_IN_CUT_SHARD:09d}.jpg")
    with open(os.path.join(output_dir, "00001.tar"), "wb") as f:
        f.write(data[: cut.offset_data + cut.size // 2])
    usable += [key for key, _ in samples[:GOOD_IN_CUT_SHARD]]

    # 00002.tar: clean.
    samples = [(f"{20000 + i:09d}", _good(rng, sources, f"{20000 + i:09d}")) for i in range(GOOD_PER_SHARD)]
    with open(os.path.join(output_dir, "00002.tar"), "wb") as f:
        f.write(_tar_bytes(samples))
    usable += [key for key, _ in samples]

    manifest = {
        "spec": os.path.join(output_dir, "{00000..00003}.tar"),  # 00003.tar is never written
        "usable_keys": usable,
        "skipped": skipped,
        "expected_skip_counts": dict(collections.Counter(skipped.values())),
        "tar_errors": 1,
        "missing_shards": 1,
        "faults": faults,
    }
    with open(os.path.join(output_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = write_faulty_shards(args.output_dir, args.seed)
    print(f"wrote {manifest['spec']}: {len(manifest['usable_keys'])} usable samples, "
          f"skips {manifest['expected_skip_counts']}, 1 cut shard, 1 missing shard")


if __name__ == "__main__":
    main()
