"""The private transformers internals hf-ens relies on, pinned one test each, so an upgrade says what broke.

`hf_ens.trainers.StarSSETrainer` overrides three private `Trainer` hooks (`_get_train_sampler`,
`_save_checkpoint`, `_load_from_checkpoint`) and the undocumented `set_initial_training_values`, reads a few
private attributes, calls `_get_num_items_in_batch` (a branch step's loss is the loop's), and sets the LR
of a global step through `LambdaLR`'s attributes; each test checks the upstream signature and, where the
trainer unpacks a result, its shape, and fails with a message naming the hook.
The last test pins the upstream bug the trainer's resume works around (transformers #48805): when it starts
failing, upstream is fixed and the workaround can go. `hf_ens.heads.reinit_task_head` uses no
private hook any more (PyTorch's public ``reset_parameters``), which its test shows.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from hf_ens.trainers import StarSSETrainer
from hf_ens.trainers.starsse_trainer import PREFIX_CHECKPOINT_DIR
from torch.utils.data import DataLoader, RandomSampler
from transformers import Trainer, TrainingArguments, set_seed

from hf_ens.heads import reinit_task_head, task_heads
from hf_ens.testing_utils import TinyImages, tiny_vit


def _params(hook: str) -> list[str]:
    return list(inspect.signature(getattr(Trainer, hook)).parameters)


def _require(condition: bool, hook: str, what: str) -> None:
    assert condition, (
        f"transformers.Trainer.{hook} changed ({what}); StarSSETrainer overrides it "
        "(trainers/starsse_trainer.py): update the override and this test."
    )


def _args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                  use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
                  remove_unused_columns=False)  # fmt: skip
    return TrainingArguments(**{**kwargs, **overrides})


def _collate(features):
    return {k: torch.stack([f[k] for f in features]) for k in ("pixel_values", "labels")}


def test_overridden_private_hooks_are_exactly_the_pinned_ones():
    ours = {
        n
        for n in vars(StarSSETrainer)
        if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)
    }
    assert ours == {"_get_train_sampler", "_save_checkpoint", "_load_from_checkpoint"}, (
        f"StarSSETrainer overrides private Trainer hooks {sorted(ours)}: give each new one a test here."
    )


def test_set_initial_training_values_signature_and_seven_values(tmp_path):
    hook = "set_initial_training_values"
    _require(_params(hook) == ["self", "args", "dataloader"], hook, f"signature {_params(hook)}")
    trainer = Trainer(model=tiny_vit(0), args=_args(tmp_path), data_collator=_collate)
    loader = DataLoader(TinyImages(24), batch_size=4)
    values = trainer.set_initial_training_values(trainer.args, loader)
    # epochs, steps per epoch, examples, train samples, total batch, steps in epoch, max steps
    _require(isinstance(values, tuple) and len(values) == 7, hook, f"returns {values!r}, not 7 values")
    _require(tuple(values) == (2, 6, 24, 48, 4, 6, 12), hook, f"value order/meaning: got {values}")


def test_get_train_sampler_signature_and_random_sampler(tmp_path):
    hook = "_get_train_sampler"
    _require(_params(hook) == ["self", "train_dataset"], hook, f"signature {_params(hook)}")
    dataset = TinyImages(24)
    trainer = Trainer(model=tiny_vit(0), args=_args(tmp_path), train_dataset=dataset, data_collator=_collate)
    sampler = trainer._get_train_sampler(dataset)
    _require(type(sampler) is RandomSampler, hook, f"returns {type(sampler).__name__}, not a RandomSampler")
    _require(len(sampler.data_source) == 24, hook, "RandomSampler.data_source is not the dataset")
    _require(
        trainer.get_train_dataloader() is not None, hook, "get_train_dataloader no longer builds a loader"
    )


def test_save_checkpoint_signature_output_dir_and_call(tmp_path):
    hook = "_save_checkpoint"
    _require(_params(hook) == ["self", "model", "trial"], hook, f"signature {_params(hook)}")
    calls = []

    class Recording(Trainer):
        def _save_checkpoint(self, model, trial):
            calls.append(
                os.path.join(
                    self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                )
            )
            super()._save_checkpoint(model, trial)

    args = _args(tmp_path, save_strategy="steps", save_steps=3, max_steps=3)
    trainer = Recording(model=tiny_vit(0), args=args, train_dataset=TinyImages(12), data_collator=_collate)
    _require(_params("_get_output_dir") == ["self", "trial"], "_get_output_dir", "signature")
    trainer.train()
    _require(calls == [os.path.join(str(tmp_path), "checkpoint-3")], hook, f"not called as expected: {calls}")
    _require(
        os.path.isfile(os.path.join(calls[0], "trainer_state.json")), hook, "writes no trainer_state.json"
    )


def test_load_from_checkpoint_signature_and_call_on_resume(tmp_path):
    hook = "_load_from_checkpoint"
    _require(_params(hook) == ["self", "resume_from_checkpoint", "model"], hook, f"signature {_params(hook)}")
    calls = []

    class Recording(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            calls.append(resume_from_checkpoint)
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    args = _args(tmp_path, save_strategy="steps", save_steps=2, max_steps=4)
    Trainer(model=tiny_vit(0), args=args, train_dataset=TinyImages(12), data_collator=_collate).train()
    trainer = Recording(model=tiny_vit(1), args=args, train_dataset=TinyImages(12), data_collator=_collate)
    # these private attributes are read by StarSSETrainer._load_from_checkpoint / create_scheduler
    for name in ("is_fsdp_enabled", "is_deepspeed_enabled", "_created_lr_scheduler"):
        _require(hasattr(trainer, name), hook, f"Trainer has no attribute {name}")
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    _require(calls[:1] == [str(tmp_path / "checkpoint-2")], hook, f"not called on resume: {calls}")


def test_upstream_48805_plain_trainer_resume_still_loads_vit_weights_wrong(tmp_path):
    """transformers #48805: `Trainer._load_from_checkpoint` loads the legacy ViT key names that
    save_pretrained writes without converting them: resuming into another init keeps wrong weights."""
    args = _args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trained = Trainer(model=tiny_vit(0), args=args, train_dataset=TinyImages(12), data_collator=_collate)
    trained.train()
    saved = {k: v.clone() for k, v in trained.model.state_dict().items()}
    fresh = Trainer(model=tiny_vit(1), args=args, train_dataset=TinyImages(12), data_collator=_collate)
    fresh._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    wrong = [k for k, v in fresh.model.state_dict().items() if not torch.equal(v, saved[k])]
    assert wrong, (
        "transformers #48805 looks fixed: a plain Trainer resume now restores every ViT weight. Remove the "
        "workaround in StarSSETrainer._load_from_checkpoint (keep only the cycle-state part) and this test."
    )
    assert any(".layers." in k for k in wrong)  # the renamed encoder weights are the ones left unloaded


def test_reinit_task_head_is_a_fresh_default_linear_under_the_seed():
    """No `_init_weights` / `_is_hf_initialized`: the head is drawn as PyTorch draws a new nn.Linear."""
    model = tiny_vit(0)
    backbone = {k: v.clone() for k, v in model.vit.state_dict().items()}
    set_seed(5)
    reinit_task_head(model)
    set_seed(5)
    expected = torch.nn.Linear(model.classifier.in_features, model.classifier.out_features)
    assert torch.equal(model.classifier.weight, expected.weight) and torch.equal(
        model.classifier.bias, expected.bias
    )
    assert all(torch.equal(v, backbone[k]) for k, v in model.vit.state_dict().items())  # backbone untouched
    set_seed(6)
    other = reinit_task_head(tiny_vit(0)).classifier.weight
    assert not torch.equal(other, model.classifier.weight)  # another seed, another head
    assert [type(h).__name__ for h in task_heads(model)] == ["Linear"]
    with pytest.raises(ValueError, match="no task head"):
        reinit_task_head(torch.nn.Linear(2, 2))


def test_lambda_lr_attributes_the_global_step_schedule_uses():
    """`_GlobalStepLR.sync` (trainers/starsse_trainer.py) sets the LR of a global step through LambdaLR's
    public attributes `last_epoch`, `base_lrs`, `lr_lambdas`, and the Trainer logs `get_last_lr()`."""
    from hf_ens.trainers.starsse_trainer import _GlobalStepLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = _GlobalStepLR(optimizer, lambda step: 1.0 / (1 + step))
    assert scheduler.base_lrs == [0.5] and len(scheduler.lr_lambdas) == 1 and scheduler.last_epoch == 0
    scheduler.sync(3)
    assert scheduler.last_epoch == 3
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == 0.125
    optimizer.step()
    scheduler.step()  # the Trainer's own call: LambdaLR's formula at the next step
    assert scheduler.last_epoch == 4 and scheduler.get_last_lr() == [0.1]
    assert "get_last_lr" in inspect.getsource(Trainer._get_learning_rate), (
        "transformers.Trainer._get_learning_rate no longer logs lr_scheduler.get_last_lr(); check the LR "
        "StarSSETrainer's logs show."
    )


def test_save_pretrained_asks_should_save_on_this_rank(tmp_path):
    """`trainers.cycles.MemberCycles.save_member` lets a non-zero rank write its member (parallel_members)
    by shadowing `PreTrainedModel.should_save_on_this_rank` on the model: transformers 5.24 writes nothing
    on rank != 0."""
    from transformers import PreTrainedModel

    hook = "should_save_on_this_rank"
    params = list(inspect.signature(getattr(PreTrainedModel, hook, lambda: None)).parameters)
    assert params == ["self", "is_main_process"], (
        f"transformers.PreTrainedModel.{hook} changed ({params}); trainers/cycles.py relies on it "
        "(_saves_on_this_process): update it and this test."
    )
    model = tiny_vit(0)
    model.should_save_on_this_rank = lambda is_main_process: False
    model.save_pretrained(tmp_path / "skipped")
    assert not list((tmp_path / "skipped").glob("*.safetensors")), f"save_pretrained no longer asks {hook}"


def test_branches_and_probe_use_only_the_public_interface_of_the_trainer():
    """`trainers.branches` and `trainers.probe` drive the trainer through its documented methods
    (start_cycle, save_member, new_lr_scheduler, diverged_message, ...), never its private members, so the
    trainer's internals can change without breaking them."""
    import ast

    import hf_ens.trainers.branches as branches
    import hf_ens.trainers.probe as probe

    for module in (branches, probe):
        tree = ast.parse(inspect.getsource(module))
        private = sorted(
            {
                node.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, (ast.Name, ast.Attribute))
                and (getattr(node.value, "id", None) or getattr(node.value, "attr", None)) == "trainer"
                and node.attr.startswith("_")
            }
        )
        assert not private, f"{module.__name__} reads private trainer members {private}"
    for name in ("start_cycle", "save_member", "new_lr_scheduler", "diverged_message", "check_losses"):
        assert getattr(StarSSETrainer, name).__doc__, f"StarSSETrainer.{name} is public: document it"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_step_num_items_is_the_trainers_own_count(tmp_path, family):
    """`StarSSETrainer.step_num_items` (the branch loop's and the probes' step loss) calls the private
    ``Trainer._get_num_items_in_batch``: the count of labels not -100 over a step's micro-batches (shifted for
    Llama; unshifted for GPT2LMHeadModel, whose loss_type the Trainer does not recognise), a tensor."""
    from hf_ens.trainers import StarSSEConfig
    from transformers import DataCollatorForLanguageModeling

    from tests._lm import lm_texts, tiny_gpt2, tiny_llama, word_tokenizer

    hook = "_get_num_items_in_batch"
    _require(_params(hook) == ["self", "batch_samples", "device"], hook, "its signature")
    model = (tiny_gpt2 if family == "gpt2" else tiny_llama)(0)
    args = StarSSEConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_members=2)
    trainer = StarSSETrainer(model=model, args=args)
    tokenizer = word_tokenizer(padding_side="right")
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    texts = lm_texts(6)
    batches = [collate([dict(tokenizer(t)) for t in texts[i : i + 3]]) for i in (0, 3)]
    labels = [b["labels"][:, 1:] if family == "llama" else b["labels"] for b in batches]
    got = trainer.step_num_items(batches)
    _require(torch.is_tensor(got), hook, f"returns {type(got).__name__}")
    _require(int(got) == sum(int(x.ne(-100).sum()) for x in labels), hook, "its counting rule")
    assert trainer.args.average_tokens_across_devices is True  # `alone` restores the setting
