"""StarSSETrainer on causal LMs (issue 23): after train(), ensemble() is an LM ensemble that generates and
soup() a plain causal LM, for full members (tiny GPT2, tied embeddings) and LoRA members (tiny Llama)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from hf_ens.trainers import StarSSETrainer
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, GPT2LMHeadModel, LlamaForCausalLM

from hf_ens import EnsembleModelForCausalLM, lm_ensemble_metrics
from hf_ens.adapters_lm import AdapterEnsembleModelForCausalLM
from hf_ens.testing_utils import one_torch_thread
from tests._lm import tiny_gpt2, tiny_llama, word_tokenizer
from tests._trainer_utils import starsse_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the small red bird saw a big green tree",
    "it was night and the dog was home",
] * 4


def _train(tmp_path, model, **overrides):
    tokenizer = word_tokenizer(padding_side="right")
    data = Dataset.from_dict(dict(tokenizer(TEXTS)))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    settings = dict(num_members=2, remove_unused_columns=True, learning_rate=1e-2, cycle_learning_rate=5e-3)
    args = starsse_config(tmp_path, **{**settings, **overrides})
    trainer = StarSSETrainer(
        model=model.train(), args=args, train_dataset=data, data_collator=collator, processing_class=tokenizer
    )
    trainer.train()
    return trainer, collator([dict(tokenizer(t)) for t in TEXTS[:4]])


def _check(trainer, batch, ens_type, soup_type):
    ens, soup = trainer.ensemble(), trainer.soup()
    assert type(ens) is ens_type and type(soup) is soup_type
    assert ens.metadata["method"] == "starsse" and ens.num_members == 2
    with torch.no_grad():
        out = ens(**batch)
        got = lm_ensemble_metrics(out.member_logits, batch["labels"], soup_logits=soup(**batch).logits)
    assert got["ensemble/nll"] == pytest.approx(out.loss.item(), abs=1e-5)
    assert got["ensemble/nll"] < got["member_mean/nll"] and got["diversity/mutual_information"] > 0
    prompt = ens.processor(["the cat", "a"], return_tensors="pt", padding=True, padding_side="left")
    tokens = ens.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (2, prompt["input_ids"].shape[1] + 4)
    return ens, soup


def test_starsse_gpt2_members_give_an_lm_ensemble_and_a_tied_soup(tmp_path):
    trainer, batch = _train(tmp_path, tiny_gpt2(0))
    _, soup = _check(trainer, batch, EnsembleModelForCausalLM, GPT2LMHeadModel)
    assert soup.lm_head.weight is soup.transformer.wte.weight


def test_starsse_lora_llama_members_give_an_adapter_lm_ensemble(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, batch = _train(
        tmp_path, get_peft_model(tiny_llama(0), config), learning_rate=5e-2, cycle_learning_rate=2e-2
    )
    _check(trainer, batch, AdapterEnsembleModelForCausalLM, LlamaForCausalLM)


def test_auto_cycle_learning_rate_on_a_causal_lm_judges_the_basin_by_token_nll(tmp_path):
    """cycle_learning_rate="auto" on GPT2: the probes score the held-out split by the padding-safe token NLL
    (shifted labels, -100 ignored), so model 1's probe loss is make_lm_eval_fn's NLL of member 0."""
    from hf_ens import make_lm_eval_fn

    tokenizer = word_tokenizer(padding_side="right")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    held_out = Dataset.from_dict(dict(tokenizer(TEXTS[:4])))
    data = Dataset.from_dict(dict(tokenizer(TEXTS)))
    args = starsse_config(
        tmp_path,
        num_members=2,
        learning_rate=1e-2,
        cycle_learning_rate="auto",
        cycle_lr_grid=[0.5, 4.0],
        probe_search="linear",
    )
    trainer = StarSSETrainer(
        model=tiny_gpt2(0).train(),
        args=args,
        train_dataset=data,
        eval_dataset=held_out,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.train()
    probe = trainer.basin_probe
    assert probe["mode"] == "auto" and 1 <= len(probe["table"]) <= 2
    assert trainer.chosen_cycle_learning_rate == pytest.approx(probe["cycle_learning_rate"])
    assert probe["cycle_learning_rate"] in (pytest.approx(0.5e-2), pytest.approx(4e-2))
    loader = torch.utils.data.DataLoader(held_out, batch_size=4, collate_fn=collator)
    member0 = GPT2LMHeadModel.from_pretrained(trainer.member_paths[0])
    assert probe["model1"]["eval_loss"] == pytest.approx(-make_lm_eval_fn(loader)(member0), abs=1e-5)
    # padding-safe and per token: the NLL of every unpadded text summed, over the number of scored tokens
    token_nll, sequence_nll = _hand_nll(member0, tokenizer, TEXTS[:4])
    assert probe["model1"]["eval_loss"] == pytest.approx(token_nll, abs=1e-5)
    assert abs(token_nll - sequence_nll) > 1e-3  # the held-out texts differ in length: the test can tell
    assert all(row["eval_loss"] is None or row["eval_loss"] > 0 for row in probe["table"])
    assert isinstance(trainer.ensemble(), EnsembleModelForCausalLM)


def _hand_nll(model, tokenizer, texts) -> tuple[float, float]:
    """(token-level NLL, mean of per-text NLLs) of `model` on `texts`, one unpadded text at a time."""
    total, count, per_text = 0.0, 0, []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            log_p = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            nll = -log_p.gather(-1, ids[0, 1:, None]).sum().item()
            total, count = total + nll, count + ids.shape[1] - 1
            per_text.append(nll / (ids.shape[1] - 1))
    return total / count, sum(per_text) / len(per_text)


def test_auto_cycle_learning_rate_on_lora_llama_members_judges_the_merged_weights(tmp_path):
    """cycle_learning_rate="auto" on LoRA causal-LM members: model 1's probe loss is the token NLL (padding
    ignored, per token) of member 0 merged by peft; the probes record a table and choose from the grid."""
    from hf_ens.trainers.probe import PROBE_FILE
    from peft import PeftModel

    tokenizer = word_tokenizer(padding_side="right")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = starsse_config(
        tmp_path,
        num_members=2,
        learning_rate=5e-2,
        cycle_learning_rate="auto",
        cycle_lr_grid=[0.5, 2.0, 50.0],
        probe_search="linear",
    )
    trainer = StarSSETrainer(
        model=get_peft_model(tiny_llama(0), config).train(),
        args=args,
        train_dataset=Dataset.from_dict(dict(tokenizer(TEXTS))),
        eval_dataset=Dataset.from_dict(dict(tokenizer(TEXTS[:4]))),
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.train()
    probe = trainer.basin_probe
    assert (tmp_path / PROBE_FILE).is_file() and probe["mode"] == "auto"
    multipliers = [row["multiplier"] for row in probe["table"]]
    assert multipliers == [0.5, 2.0, 50.0][: len(multipliers)] and probe["chosen_multiplier"] in multipliers
    assert trainer.chosen_cycle_learning_rate == pytest.approx(probe["chosen_multiplier"] * 5e-2)
    member0 = PeftModel.from_pretrained(tiny_llama(0), trainer.member_paths[0]).merge_and_unload()
    token_nll, _ = _hand_nll(member0, tokenizer, TEXTS[:4])
    assert probe["model1"]["eval_loss"] == pytest.approx(token_nll, abs=1e-5)
    assert all(row["diverged"] or len(row["path_loss"]) == 5 for row in probe["table"])
    assert isinstance(trainer.ensemble(), AdapterEnsembleModelForCausalLM)


def test_the_safety_net_on_lora_llama_members_under_parallel_members_leaves_no_trace(tmp_path):
    """basin_guard=True on LoRA causal-LM members with parallel_members (the branch path, a second family from
    the ViT it was built with): one probe at the set LR, judged on merged weights; kept, the adapters are
    those of the same run without the net, tensor for tensor."""
    import safetensors.torch

    tokenizer = word_tokenizer(padding_side="right")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    adapters = {}
    for name, net in (("net", True), ("plain", False)):
        args = starsse_config(
            tmp_path / name,
            num_members=3,
            learning_rate=5e-2,
            cycle_learning_rate=5e-2,
            basin_guard=net,
            cycle_lr_grid=[0.5, 2.0],  # probes of 1/4 cycle: 1 step of these 4-step cycles
            basin_tolerance=1e9,  # the set LR stays: the test is about the trace, not the rule
            parallel_members=True,
        )
        trainer = StarSSETrainer(
            model=get_peft_model(tiny_llama(0), config).train(),
            args=args,
            train_dataset=Dataset.from_dict(dict(tokenizer(TEXTS))),
            eval_dataset=Dataset.from_dict(dict(tokenizer(TEXTS[:4]))),
            data_collator=collator,
            processing_class=tokenizer,
        )
        trainer.train()
        if net:
            probe = trainer.basin_probe
            assert probe["mode"] == "guard" and [row["multiplier"] for row in probe["table"]] == [1.0]
            assert "kept" in probe["reason"] and trainer.chosen_cycle_learning_rate == pytest.approx(5e-2)
        adapters[name] = [
            safetensors.torch.load_file(f"{path}/adapter_model.safetensors") for path in trainer.member_paths
        ]
    for k, (got, ref) in enumerate(zip(adapters["net"], adapters["plain"], strict=True)):
        assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in got), k
