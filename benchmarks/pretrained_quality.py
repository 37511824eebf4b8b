"""Quality of the shipped diffusion priors: the acceptance figures of issue 5.

    python benchmarks/pretrained_quality.py --dataset digits
    python benchmarks/pretrained_quality.py --dataset patches16

For each prior (a shipped name or a checkpoint directory via `--checkpoint`):

- **Denoising MSE on held-out data** at noise ratios `sigma/alpha` in `--ratios`: for held-out
  `x_0` (digits: `load_digits_images(split="test")`; patches16: patches of the held-out images),
  `x_t = alpha x_0 + sigma e` and the MSE of the Tweedie denoiser `x0_hat(x_t, t)` against `x_0`,
  for the network and for the exact denoiser of the Gaussian-mixture reference (`<name>-gmm`)
  on the **same** noisy images. The standard error of the paired per-image difference is
  reported beside it.
- **digits only**: `--num-samples` draws by ancestral sampling (`--num-steps` steps); a
  scikit-learn logistic-regression classifier trained on the real training digits labels each;
  the fraction with top-class probability >= 0.8 (and the same for held-out real digits as a
  reference). Memorisation: Euclidean distance of each draw to its nearest training digit,
  against the same for held-out real digits.
- **patches16 only**: 64 draws; fractions of flat (pixel std < 0.02) and saturated (mean
  beyond +-0.9) draws, against the same for the held-out patches.
- A sample grid PNG (`--grid`).

Writes JSON to `benchmarks/results/pretrained_quality_<dataset>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import numpyro_mlmc as nm  # noqa: E402
from numpyro_mlmc._data import load_digits_images, load_patches16  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CARDS = Path(__file__).parent.parent / "docs" / "model_cards"


def denoising_table(net_model, gmm_model, schedule, images, ratios, seed, batch=512):
    """Per noise ratio: MSE of the network's and the GMM's denoiser on the same draws."""
    net_fn = jax.jit(jax.vmap(net_model.denoise, in_axes=(0, None)))
    gmm_fn = jax.jit(jax.vmap(gmm_model.denoise, in_axes=(0, None)))
    rows = []
    for i, ratio in enumerate(ratios):
        t = schedule.time_at_noise_ratio(ratio)
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        noise = np.asarray(jr.normal(jr.fold_in(jr.PRNGKey(seed), i), images.shape))
        xt = a * images + s * noise
        err_net, err_gmm = [], []
        for j in range(0, images.shape[0], batch):
            x0 = images[j : j + batch]
            xb = jnp.asarray(xt[j : j + batch])
            tt = jnp.float32(t)
            axes = tuple(range(1, x0.ndim))
            err_net.append(np.mean((np.asarray(net_fn(xb, tt)) - x0) ** 2, axis=axes))
            err_gmm.append(np.mean((np.asarray(gmm_fn(xb, tt)) - x0) ** 2, axis=axes))
        err_net, err_gmm = np.concatenate(err_net), np.concatenate(err_gmm)
        diff = err_net - err_gmm
        rows.append(
            {
                "noise_ratio": ratio,
                "t": t,
                "mse_network": float(err_net.mean()),
                "mse_gmm_exact": float(err_gmm.mean()),
                "difference": float(diff.mean()),
                "difference_standard_error": float(diff.std(ddof=1) / np.sqrt(diff.size)),
                "network_better": bool(err_net.mean() < err_gmm.mean()),
            }
        )
        print(
            f"  ratio {ratio:5.2f}: network {err_net.mean():.5f}  GMM {err_gmm.mean():.5f}  "
            f"diff {diff.mean():+.5f} +- {rows[-1]['difference_standard_error']:.5f}",
            flush=True,
        )
    return rows


def flatness(x, flat_std=0.02, saturated=0.9):
    """Fractions of flat images (pixel std < `flat_std`) and of saturated ones (mean below
    `-saturated` or above `saturated`): the failure mode of an under-trained patch prior."""
    x = np.asarray(x).reshape(len(x), -1)
    mean, std = x.mean(1), x.std(1)
    return {
        "count": int(len(x)),
        f"fraction_std_below_{flat_std}": float(np.mean(std < flat_std)),
        f"fraction_mean_below_-{saturated}": float(np.mean(mean < -saturated)),
        f"fraction_mean_above_{saturated}": float(np.mean(mean > saturated)),
        "fraction_flat_and_saturated": float(
            np.mean((std < flat_std) & (np.abs(mean) > saturated))
        ),
        "median_pixel_std": float(np.median(std)),
    }


def save_grid(samples, path, title, ncols=10):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = samples.shape[0]
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.8, nrows * 0.8 + 0.4))
    for ax, i in zip(axes.ravel(), range(nrows * ncols), strict=True):
        ax.axis("off")
        if i < n:
            ax.imshow(np.clip(samples[i], -1, 1), cmap="gray", vmin=-1, vmax=1)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def digits_figures(prior, args, out):
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = load_digits_images(split="train")
    test_x, test_y = load_digits_images(split="test")
    classifier = LogisticRegression(max_iter=5000, C=1.0)
    classifier.fit(train_x.reshape(len(train_x), -1), train_y)
    test_prob = classifier.predict_proba(test_x.reshape(len(test_x), -1))
    out["classifier"] = {
        "model": "sklearn LogisticRegression(C=1.0) on the 64 pixels of the training split",
        "held_out_accuracy": float(np.mean(test_prob.argmax(1) == test_y)),
        "held_out_fraction_confidence_ge_0.8": float(np.mean(test_prob.max(1) >= 0.8)),
    }
    t0 = time.perf_counter()
    samples = np.asarray(
        prior.sample_reverse(
            jr.PRNGKey(args.seed + 1), (args.num_samples,), num_steps=args.num_steps
        )
    )
    seconds = time.perf_counter() - t0
    prob = classifier.predict_proba(np.clip(samples, -1, 1).reshape(len(samples), -1))
    conf = prob.max(1)
    out["samples"] = {
        "num_samples": args.num_samples,
        "sampler": f"ancestral, {args.num_steps} uniform steps, from t=1",
        "seconds": round(seconds, 1),
        "fraction_confidence_ge_0.8": float(np.mean(conf >= 0.8)),
        "mean_confidence": float(conf.mean()),
        "class_counts": np.bincount(prob.argmax(1), minlength=10).tolist(),
        "pixel_range": [float(samples.min()), float(samples.max())],
    }
    flat_train = train_x.reshape(len(train_x), -1).astype(np.float64)

    def nn_dist(x):
        x = x.reshape(len(x), -1).astype(np.float64)
        d2 = (x**2).sum(1)[:, None] - 2 * x @ flat_train.T + (flat_train**2).sum(1)[None]
        return np.sqrt(np.maximum(d2.min(1), 0))

    d_samples, d_real = nn_dist(samples), nn_dist(test_x)
    out["memorisation"] = {
        "metric": "Euclidean distance (on [-1, 1] pixels) to the nearest training digit",
        "samples_median": float(np.median(d_samples)),
        "samples_mean": float(d_samples.mean()),
        "samples_5th_percentile": float(np.percentile(d_samples, 5)),
        "held_out_real_median": float(np.median(d_real)),
        "held_out_real_mean": float(d_real.mean()),
        "held_out_real_5th_percentile": float(np.percentile(d_real, 5)),
        "samples_not_closer_than_held_out": bool(np.median(d_samples) >= np.median(d_real)),
    }
    print(f"  samples: {out['samples']}", flush=True)
    print(f"  memorisation: {out['memorisation']}", flush=True)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "patches16"], required=True)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped prior")
    parser.add_argument("--gmm", default=None, help="default: the shipped <dataset>-gmm")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.5, 1.0, 2.0])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--num-steps", type=int, default=128)
    parser.add_argument("--num-test-patches", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--grid", default=None)
    args = parser.parse_args(argv)

    name = args.checkpoint or args.dataset
    prior = nm.DiffusionPrior.from_pretrained(name, batch_size=max(args.num_samples, 64))
    gmm = nm.DiffusionPrior.from_pretrained(args.gmm or f"{args.dataset}-gmm")
    out = {
        "command": "python benchmarks/pretrained_quality.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "checkpoint": args.checkpoint or f"shipped:{args.dataset}",
        "weights_sha256": prior.config["weights"]["sha256"],
        "training": prior.config["training"],
        "gmm_components": int(gmm.num_components),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.dataset == "digits":
        images = load_digits_images(split="test")[0]
        out["held_out"] = f"load_digits_images(split='test'): {len(images)} digits"
    else:
        images = load_patches16(split="test", num_patches=args.num_test_patches, seed=args.seed)
        out["held_out"] = (
            f"load_patches16(split='test', num_patches={args.num_test_patches}, seed={args.seed})"
        )
    print(f"{args.dataset}: denoising MSE on held-out data", flush=True)
    t0 = time.perf_counter()
    out["denoising"] = denoising_table(
        prior.score_model(), gmm.score_model(), prior.schedule, images, args.ratios, args.seed
    )
    out["denoising_seconds"] = round(time.perf_counter() - t0, 1)
    wins = sum(r["network_better"] for r in out["denoising"])
    out["network_better_at"] = f"{wins} of {len(out['denoising'])} noise levels"
    if args.dataset == "digits":
        samples = digits_figures(prior, args, out)
    else:
        samples = np.asarray(
            prior.sample_reverse(jr.PRNGKey(args.seed + 1), (64,), num_steps=args.num_steps)
        )
        out["samples"] = {
            "num_samples": 64,
            "sampler": f"ancestral, {args.num_steps} uniform steps, from t=1",
            "draws": flatness(samples),
            "held_out_patches": flatness(images),
        }
        print(f"  samples: {out['samples']}", flush=True)
    grid = Path(args.grid) if args.grid else CARDS / f"{args.dataset}_samples.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    save_grid(
        samples[:100] if args.dataset == "digits" else samples[:64],
        grid,
        f"{args.dataset}: ancestral sampling, {args.num_steps} steps (seed {args.seed + 1})",
        ncols=10 if args.dataset == "digits" else 8,
    )
    out["grid"] = grid.name
    path = Path(args.out) if args.out else RESULTS / f"pretrained_quality_{args.dataset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"network better at {out['network_better_at']}; wrote {path.name}", flush=True)
    return out


if __name__ == "__main__":
    main()
