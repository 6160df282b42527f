"""The LoRA fine-tuning LR pilot behind compare_lora.yaml (held-out numbers decide; lr_pilot.jsonl):
model 1 (one LoRA fine-tune) at four LRs on seeds 0 and 1.

    OMP_NUM_THREADS=1 python recipes/lora_lr_pilot.py > docs/results/lora/lr_pilot.jsonl
"""

import copy
import json

import torch
from hf_ens.trainers import StarSSEConfig

from recipes._cli import parse_config_and_args
from recipes.compare_methods import CompareArguments, Task, run_task
from recipes.vit_cifar import ScriptArguments

torch.set_num_threads(1)
cmp, script, train = parse_config_and_args(
    (CompareArguments, ScriptArguments, StarSSEConfig),
    ["--config", "recipes/configs/compare_lora.yaml", "--results_dir", "/tmp/lora_pilot"],
)
cache: dict = {}
for seed in (0, 1):
    for lr in (3e-4, 1e-3, 3e-3, 1e-2):
        args = copy.deepcopy(train)
        args.learning_rate = lr
        metrics = run_task(Task("main", seed, "model1_long", 1.0), cmp, script, args, cache)["metrics"]
        row = {
            "seed": seed,
            "lr": lr,
            "train_acc": metrics["member_0/train_accuracy"],
            "held_out_acc": metrics["held_out/member_0/accuracy"],
            "held_out_nll": metrics["held_out/member_0/nll"],
        }
        print(json.dumps(row), flush=True)
