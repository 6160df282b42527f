"""Inference cost of an EnsembleModel and its soup relative to one member.

Prints ``ensemble time / (K x single)`` (goal <= 1.05: the ensemble adds nothing beyond K member forwards)
and ``soup time / single`` (goal ~1.0). Timings are interleaved (single, ensemble, soup in turn) so load from
other processes hits all three alike. The headline ratios use the minimum over repeats (the least disturbed
run, as `timeit` recommends); median-based ratios are printed as a cross-check.

    python benchmarks/ensemble_inference.py                      # ViT-Tiny-like members, K=4, CPU
    python benchmarks/ensemble_inference.py --device cuda --batch-size 256 --image-size 224 --patch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import ViTConfig, ViTForImageClassification

from benchmarks import _record
from hf_ens import EnsembleModel


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-members", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--num-labels", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    _record.add_arguments(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden_size // 64),
        intermediate_size=4 * args.hidden_size,
        num_labels=args.num_labels,
    )
    members = []
    for k in range(args.num_members):
        torch.manual_seed(k)
        members.append(ViTForImageClassification(cfg).to(args.device, dtype).eval())
    ensemble = EnsembleModel.from_members(members).eval()
    soup = ensemble.soup().eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(model) -> float:
        sync()
        start = time.perf_counter()
        model(pixel_values=x)
        sync()
        return time.perf_counter() - start

    def members_loop(pixel_values):  # the K member forwards alone: separates noise from ensemble overhead
        return [m(pixel_values=pixel_values) for m in members]

    models = {"single": members[0], "ensemble": ensemble, "soup": soup, "K members": members_loop}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for model in models.values():
                timed(model)
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(timed(model))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    K = args.num_members
    n_params = sum(p.numel() for p in members[0].parameters())
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} K={K} "
        f"batch={args.batch_size} image={args.image_size} member_params={n_params / 1e6:.2f}M "
        f"repeats={args.repeats}"
    )
    for name in models:
        print(f"{name:>9}: median {med[name] * 1e3:8.2f} ms  min {low[name] * 1e3:8.2f} ms")
    print(
        f"ensemble time / (K x single) = {low['ensemble'] / (K * low['single']):.3f}  (goal <= 1.05; "
        f"median-based {med['ensemble'] / (K * med['single']):.3f})"
    )
    print(
        f"ensemble time / K member forwards = {low['ensemble'] / low['K members']:.3f}  (averaging overhead)"
    )
    print(
        f"soup time / single = {low['soup'] / low['single']:.3f}  "
        f"(median-based {med['soup'] / med['single']:.3f})"
    )
    figures = {
        "member_params_millions": n_params / 1e6,
        "median_ms": {name: 1e3 * t for name, t in med.items()},
        "min_ms": {name: 1e3 * t for name, t in low.items()},
        "ensemble_over_k_single": low["ensemble"] / (K * low["single"]),
        "ensemble_over_k_single_median_based": med["ensemble"] / (K * med["single"]),
        "ensemble_over_k_member_forwards": low["ensemble"] / low["K members"],
        "soup_over_single": low["soup"] / low["single"],
        "soup_over_single_median_based": med["soup"] / med["single"],
    }
    _record.write(args.json, "ensemble_inference", vars(args), figures, args.note)


if __name__ == "__main__":
    main()
