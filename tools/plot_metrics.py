"""Plot a run's output_dir/metrics.jsonl: training loss, the held-out condition-use gap and condition PSNR.

    python tools/plot_metrics.py OUTPUT_DIR [--out OUTPUT_DIR/metrics.png]
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("loss", [("loss", "training loss (interval mean)"), ("holdout/loss", "held-out loss")]),
    ("condition-use gap", [("holdout/condition_gap", "held-out loss, rolled - true conditions")]),
    ("condition PSNR (dB)", [("holdout/condition_psnr", "output vs its condition"),
                             ("holdout/condition_psnr_rolled", "control: vs another sample's condition"),
                             ("holdout/jpeg30/condition_psnr", "input: area + JPEG 30 (vs clean)"),
                             ("holdout/x8/condition_psnr", "input: area 8x (vs clean 8x)")]),
]


def read_metrics(path):
    """{metric: ([steps], [values])}; a final validation repeating a step keeps its last value."""
    series = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key != "step":
                    series.setdefault(key, {})[row["step"]] = value
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in series.items()}


def plot(metrics_path, out_path):
    series = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (title, keys) in zip(axes, PANELS):
        for key, label in keys:
            if key in series:
                ax.plot(*series[key], marker="." if len(series[key][0]) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[1].axhline(0, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a training run's --output_dir (holding metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: OUTPUT_DIR/metrics.png)")
    args = parser.parse_args()
    out = plot(os.path.join(args.output_dir, "metrics.jsonl"), args.out or os.path.join(args.output_dir, "metrics.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
