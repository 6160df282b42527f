"""Member formats and task classes are registered by the modules that define them (`hf_ens.registry`)."""

from __future__ import annotations

import subprocess
import sys

from hf_ens import EnsembleForImageClassification, EnsembleForSequenceClassification, EnsembleModelForCausalLM
from hf_ens.registry import member_format, task_class


def test_task_classes_are_registered_by_their_modules():
    assert task_class("full", "ViTForImageClassification") is EnsembleForImageClassification
    assert task_class("full", "BertForSequenceClassification") is EnsembleForSequenceClassification
    assert task_class("full", "GPT2LMHeadModel") is EnsembleModelForCausalLM
    assert task_class("full", "BertModel") is None and member_format("no_such_format") is None


def test_the_adapter_format_is_imported_on_first_use_only():
    """`import hf_ens` leaves peft unloaded; asking for the adapter format loads its modules."""
    code = (
        "import sys, hf_ens; from hf_ens import registry\n"
        "assert 'hf_ens.adapters' not in sys.modules\n"
        "assert registry.member_format('peft_lora').name == 'peft_lora'\n"
        "from hf_ens.adapters_lm import AdapterEnsembleModelForCausalLM as C\n"
        "assert registry.task_class('peft_lora', 'LlamaForCausalLM') is C\n"
        "assert registry.task_class('peft_lora', 'BertForSequenceClassification') is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
