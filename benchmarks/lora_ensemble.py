"""A K-member ensemble of full members vs LoRA members: repo size on disk, peak memory, inference time.

Builds K members from one ViT (a ``ViTConfig`` model, default ViT-B/16's width and depth; nothing is
downloaded): full members (every weight moved) and LoRA members (r=8 on q/v, the head in ``modules_to_save``),
saves both as ensemble repos and reports

* disk: the full repo (K members + soup) vs the LoRA repo (K adapters + the merged soup), and one model;
* peak memory (growth of the process's peak RSS, reset through ``/proc/self/clear_refs``) of loading the repo
  and running one batch: one plain model, the full ensemble, the LoRA ensemble (goal <= 1.2x one model);
* inference time of the LoRA ensemble vs K x one LoRA model (a ``PeftModel`` with one adapter, unmerged):
  goal <= 1.05. Timings are interleaved and the ratio uses the minimum over repeats (median printed too).

    PYTHONPATH=. python benchmarks/lora_ensemble.py                  # ViT-B/16 weights, 64x64 inputs, CPU
    PYTHONPATH=. python benchmarks/lora_ensemble.py --image-size 28 --patch-size 7 --hidden-size 128 \\
        --layers 4 --heads 4 --intermediate-size 512                  # the offline demo's ViT
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from benchmarks import _record
from hf_ens import EnsembleModel
from hf_ens.adapters import AdapterEnsembleModel, save_adapter


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-members", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate-size", type=int, default=3072)
    p.add_argument("--num-labels", type=int, default=10)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    _record.add_arguments(p)
    return p.parse_args()


# ----------------------------------------------------------------------------------------------- memory
def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth(fn) -> int:
    """Peak RSS growth (bytes) while `fn()` runs; the peak is reset first, and what fn returns is released."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    result = fn()
    peak = _status("VmHWM") - before
    del result
    gc.collect()
    return peak


# ------------------------------------------------------------------------------------------------ build
def trained_members(args, base_dir: Path, work: Path) -> tuple[list[Path], list[Path]]:
    """K full members and K LoRA adapters, each a few SGD steps from the base (B != 0), written to `work`."""
    full, lora = [], []
    x = torch.randn(4, 3, args.image_size, args.image_size)
    y = torch.arange(4) % args.num_labels
    for k in range(args.num_members):
        torch.manual_seed(100 + k)
        model = ViTForImageClassification.from_pretrained(base_dir)
        with torch.no_grad():
            for p in model.parameters():  # a full fine-tune moves every weight
                p.add_(torch.randn_like(p), alpha=1e-3)
        model.save_pretrained(work / f"full_{k}")
        full.append(work / f"full_{k}")
        del model
        peft_model = get_peft_model(
            ViTForImageClassification.from_pretrained(base_dir),
            LoraConfig(
                r=args.lora_r,
                lora_alpha=2 * args.lora_r,
                target_modules=["q_proj", "v_proj"],
                modules_to_save=["classifier"],
            ),
        )
        opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
        peft_model(pixel_values=x, labels=y).loss.backward()
        opt.step()
        save_adapter(peft_model, "default", work / f"lora_{k}")
        lora.append(work / f"lora_{k}")
        del peft_model, opt
        gc.collect()
    return full, lora


def size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


# ------------------------------------------------------------------------------------------------- time
def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate_size,
        num_labels=args.num_labels,
    )
    k = args.num_members
    with tempfile.TemporaryDirectory(prefix="hf-ens-lora-bench-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        ViTForImageClassification(cfg).save_pretrained(work / "base")
        full_dirs, lora_dirs = trained_members(args, work / "base", work)
        full_repo = EnsembleModel.from_members(full_dirs).save_pretrained(work / "full_repo")
        base = ViTForImageClassification.from_pretrained(work / "base")
        lora_repo = AdapterEnsembleModel.from_adapters(base, lora_dirs).save_pretrained(work / "lora_repo")
        del base
        gc.collect()
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

        print(
            f"ViT: hidden {args.hidden_size}, {args.layers} layers, {args.image_size}px images, "
            f"{args.patch_size}px "
            f"patches; K = {k}; LoRA r = {args.lora_r} on q_proj, v_proj + head; {args.threads} thread(s)"
        )
        one = size(work / "base" / "model.safetensors")
        adapter = size(lora_repo / "member_00")
        print("\n-- disk --")
        print(f"one model                    {mib(one)}")
        print(
            f"full repo (K members + soup) {mib(size(full_repo))}  = {size(full_repo) / one:5.2f} x one model"
        )
        print(
            f"LoRA repo (K adapters + soup){mib(size(lora_repo))}  = "
            f"{size(lora_repo) / one:5.2f} x one model "
            f"(one adapter: {adapter / 2**10:.1f} KiB)"
        )

        def run(model):
            with torch.no_grad():
                model(pixel_values=x)
            return model

        single = peak_growth(lambda: run(AutoModelForImageClassification.from_pretrained(lora_repo)))
        full_ens = peak_growth(lambda: run(EnsembleModel.from_pretrained(full_repo)))
        lora_ens = peak_growth(
            lambda: run(EnsembleModel.from_pretrained(lora_repo, base_model=work / "base"))
        )
        print("\n-- peak memory (load the repo + one batch) --")
        print(f"one model                    {mib(single)}")
        print(f"full ensemble, K = {k}        {mib(full_ens)}  = {full_ens / single:5.2f} x one model")
        print(
            f"LoRA ensemble, K = {k}        {mib(lora_ens)}  = {lora_ens / single:5.2f} x one model "
            "(goal <= 1.2)"
        )

        ens = EnsembleModel.from_pretrained(lora_repo, base_model=work / "base").eval()
        one_lora = PeftModel.from_pretrained(
            ViTForImageClassification.from_pretrained(work / "base"), str(lora_repo / "member_00")
        ).eval()
        with torch.no_grad():
            for _ in range(2):
                ens(pixel_values=x), one_lora(pixel_values=x)
            t_single, t_ens = [], []
            for _ in range(args.repeats):  # interleaved: background load hits both alike
                t_single += timed(lambda: one_lora(pixel_values=x), 1)
                t_ens += timed(lambda: ens(pixel_values=x), 1)
        ratio = min(t_ens) / (k * min(t_single))
        median = statistics.median(t_ens) / (k * statistics.median(t_single))
        print("\n-- inference, batch", args.batch_size, "--")
        print(f"one LoRA model {min(t_single) * 1e3:8.1f} ms; LoRA ensemble {min(t_ens) * 1e3:8.1f} ms")
        print(
            f"ensemble / (K x one LoRA model): {ratio:.3f} (min over {args.repeats}; "
            f"median-based {median:.3f}; "
            "goal <= 1.05)"
        )
        full_size, lora_size = size(full_repo), size(lora_repo)
        figures = {
            "disk": {
                "one_model_mib": one / 2**20,
                "full_repo_mib": full_size / 2**20,
                "full_repo_over_one_model": full_size / one,
                "lora_repo_mib": lora_size / 2**20,
                "lora_repo_over_one_model": lora_size / one,
                "one_adapter_kib": adapter / 2**10,
                "lora_repo_files": sorted(p.relative_to(lora_repo).as_posix() for p in lora_repo.glob("*")),
            },
            "peak_memory": {
                "one_model_mib": single / 2**20,
                "full_ensemble_mib": full_ens / 2**20,
                "full_ensemble_over_one_model": full_ens / single,
                "lora_ensemble_mib": lora_ens / 2**20,
                "lora_ensemble_over_one_model": lora_ens / single,
            },
            "inference": {
                "one_lora_model_min_ms": 1e3 * min(t_single),
                "lora_ensemble_min_ms": 1e3 * min(t_ens),
                "ensemble_over_k_one_lora_model": ratio,
                "ensemble_over_k_one_lora_model_median_based": median,
            },
        }
    _record.write(args.json, "lora_ensemble", vars(args), figures, args.note)


if __name__ == "__main__":
    main()
