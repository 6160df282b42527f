"""Peak memory and time of `uniform_soup` and `greedy_soup` over K member directories of a ~100 MB model.

Goal: peak RSS growth <= 3 x one member's state dict (a streaming running mean holds about two: the sum and
the member being added), whatever K is. The members are K perturbed copies of a ViT (~25M fp32 parameters)
written with ``save_pretrained`` into a temporary folder. Each soup runs in a fresh subprocess that first
imports everything and loads a tiny ViT (so lazy imports and allocator warm-up are in the baseline); the
figure is ``VmHWM - VmRSS at the baseline``, i.e. the RSS the soup added at its peak, over one state dict.

    PYTHONPATH=. python benchmarks/soup_memory.py                     # this checkout's hf_ens
    PYTHONPATH=/path/to/other/checkout python benchmarks/soup_memory.py   # compare another version

The hf_ens that was measured is printed (``hf_ens from ...``): the script never edits sys.path itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-members", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--workdir", default=None, help="Where to write the members (default: a temp dir).")
    p.add_argument("--soups", nargs="+", default=["uniform", "greedy"], choices=["uniform", "greedy"])
    p.add_argument("--child", choices=["uniform", "greedy"], help=argparse.SUPPRESS)
    _record.add_arguments(p)
    return p.parse_args(argv)


def _config(args: argparse.Namespace):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=32,
        patch_size=4,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden_size // 64),
        intermediate_size=4 * args.hidden_size,
        num_labels=10,
    )


def write_members(args: argparse.Namespace, root: Path) -> int:
    """K perturbed copies of one ViT (as fine-tuned members of one checkpoint are) + a tiny warm-up ViT.

    Returns the bytes of one member's state dict."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    base = ViTForImageClassification(_config(args))
    nbytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    original = {k: v.clone() for k, v in base.state_dict().items()}
    for k in range(args.num_members):
        generator = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for name, tensor in base.state_dict().items():
                if tensor.is_floating_point():
                    noise = torch.randn(tensor.shape, generator=generator) * 0.01
                    tensor.copy_(original[name] + noise)
        base.save_pretrained(root / f"member_{k:02d}")
    del base, original
    tiny = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)  # fmt: skip
    ViTForImageClassification(tiny).save_pretrained(root / "warmup")
    return nbytes


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(kind: str, root: Path) -> None:
    """One soup in this (fresh) process; prints a JSON line with the baseline, the peak and the time."""
    import torch
    from transformers import ViTForImageClassification

    import hf_ens

    torch.set_num_threads(1)
    ViTForImageClassification.from_pretrained(root / "warmup")  # lazy imports and loader warm-up
    paths = sorted(p for p in root.glob("member_*") if p.is_dir())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def eval_fn(model) -> float:  # a deterministic held-out "score": closeness of the logits to a target
        with torch.no_grad():
            return -model(pixel_values=pixels).logits.sub(0.1).pow(2).mean().item()

    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    if kind == "uniform":
        soup, chosen = hf_ens.uniform_soup(paths), list(range(len(paths)))
    else:
        soup, chosen = hf_ens.greedy_soup(paths, eval_fn)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    assert soup is not None
    print(json.dumps({"kind": kind, "baseline_kib": baseline, "peak_kib": peak, "seconds": seconds,
                      "chosen": chosen, "hf_ens": hf_ens.__file__}))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child, Path(args.workdir))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="soup_memory-") as tmp:
        root = Path(tmp)
        nbytes = write_members(args, root)
        print(f"{args.num_members} members of {nbytes / 2**20:.1f} MiB (state dict) in {root}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
        figures = {"member_state_dict_mib": nbytes / 2**20}
        for kind in args.soups:
            cmd = [sys.executable, __file__, "--child", kind, "--workdir", str(root)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{kind} soup failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            grown = (result["peak_kib"] - result["baseline_kib"]) * 1024
            print(f"hf_ens from {result['hf_ens']}")
            print(
                f"{kind:>8} soup: peak RSS growth {grown / 2**20:7.1f} MiB = {grown / nbytes:.2f} x one "
                f"state dict (goal <= 3), {result['seconds']:.1f} s, members {result['chosen']}",
                flush=True,
            )
            figures[kind] = {
                "peak_rss_growth_mib": grown / 2**20,
                "peak_over_state_dict": grown / nbytes,
                "seconds": result["seconds"],
                "members_chosen": result["chosen"],
                "hf_ens": result["hf_ens"],
            }
    _record.write(args.json, "soup_memory", vars(args), figures, args.note)


if __name__ == "__main__":
    main()
