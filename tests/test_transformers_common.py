"""transformers' own common model tests on every ensemble class: the ensemble is a transformers model.

``ModelTesterMixin`` and ``ConfigTester`` come from the installed transformers version's source distribution
(`tests/_transformers_common.py`: fetched once, cached, never vendored). The testers below are written the way
transformers writes its own (tests/models/vit/test_modeling_vit.py, tests/models/bert/test_modeling_bert.py):
a ModelTester giving a config and inputs, then the TestCase with ONLY the opt-out flags ViT (resp. BERT)
sets. The ensemble's config is an `EnsembleConfig` of K=2 tiny members; the members come from it.

Skips are transformers' own (``require_*``, ``slow``, flags ViT/BERT set) or on `NOT_APPLICABLE`, each with
its reason (also in docs/transformers_model.md).
"""

from __future__ import annotations

import copy
import re
import unittest
from unittest import mock

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, ViTConfig
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from hf_ens import (
    EnsembleConfig,
    EnsembleForImageClassification,
    EnsembleForSequenceClassification,
    EnsembleForTokenClassification,
    EnsembleModelForCausalLM,
)
from tests import _transformers_common

common = _transformers_common.load_or_skip()
ModelTesterMixin = common.test_modeling_common.ModelTesterMixin
GenerationTesterMixin = common.test_modeling_common.GenerationTesterMixin
ConfigTester = common.test_configuration_common.ConfigTester
floats_tensor = common.test_modeling_common.floats_tensor
ids_tensor = common.test_modeling_common.ids_tensor
random_attention_mask = common.test_modeling_common.random_attention_mask

K = 2

# Tests that cannot mean anything for an ensemble of K models, with the reason (the documented list, also in
# docs/transformers_model.md). Everything else runs as transformers runs it.
_PER_MEMBER = (
    "hidden states and attentions are K sets, one per member in its own basis: the ensemble returns a tuple "
    "over members of each member's tuple, not one tuple over layers"
)
_K_TABLES = "K input-embedding tables (one per member): get/set/resize act on a member, ens.members[k]"
_ROOT_SOUP = (
    "the repo root model.safetensors is the uniform soup (so plain transformers loads the repo as one "
    "model), not the ensemble's state dict; members are in member_XX/ and the loader refuses changed files"
)
NOT_APPLICABLE: dict[str, str] = {
    "test_hidden_states_output": _PER_MEMBER,
    "test_attention_outputs": _PER_MEMBER,
    "test_retain_grad_hidden_states_attentions": _PER_MEMBER,
    "test_can_capture_specific_layers_hidden_states": _PER_MEMBER,  # passes by chance at K=2, fails at K=3
    "test_model_get_set_embeddings": _K_TABLES,
    "test_resize_tokens_embeddings": _K_TABLES,
    "test_load_save_without_tied_weights": _ROOT_SOUP,
    "test_model_weights_reload_no_missing_tied_weights": _ROOT_SOUP,
}


# Not applicable to the causal-LM ensemble only: for a class not named "*Classification", the eager-vs-
# sdpa test compares the last hidden state (there is none for an ensemble: K sets, `_PER_MEMBER`); the
# classifiers pass it on their logits, and `test_eager_matches_sdpa_logits` below checks the LM's logits.
LM_NOT_APPLICABLE: dict[str, str] = {
    "test_eager_matches_sdpa_inference": (
        "it compares the last hidden state, and an ensemble has K (one per member, in its own basis); "
        "the ensemble's logits are compared instead (test_eager_matches_sdpa_logits)"
    ),
}


def not_applicable(cls):
    """Skip the `NOT_APPLICABLE` tests (and the class's own ``not_applicable_here``, parameterized variants
    included) on a TestCase class, each with its reason."""
    table = {**NOT_APPLICABLE, **getattr(cls, "not_applicable_here", {})}
    for attr in dir(cls):
        # `name` itself, or its parameterized variants `name_<index>_...`
        base = re.sub(r"_\d+(_.*)?$", "", attr)
        reason = table.get(attr, table.get(base))
        if reason is not None and callable(getattr(cls, attr)):  # parameterized leaves its template as None
            setattr(cls, attr, unittest.skip(f"not applicable to an ensemble: {reason}")(getattr(cls, attr)))
    return cls


@pytest.fixture(autouse=True, scope="module")
def _listed_as_classifiers():
    """transformers' tests pick a class's labels and checks by its name in the task mappings (as a model of
    theirs is listed in modeling_auto): list the ensemble classes there, for this module only."""
    with (
        mock.patch.dict(
            modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
            {EnsembleConfig.model_type: EnsembleForImageClassification.__name__},
        ),
        mock.patch.dict(
            modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            {EnsembleConfig.model_type: EnsembleForSequenceClassification.__name__},
        ),
        mock.patch.dict(
            modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
            {EnsembleConfig.model_type: EnsembleForTokenClassification.__name__},
        ),
        mock.patch.dict(
            modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            {EnsembleConfig.model_type: EnsembleModelForCausalLM.__name__},
        ),
    ):
        yield


def _ensemble_config(member_config, num_members: int = K) -> EnsembleConfig:
    return EnsembleConfig(
        members=[f"member_{k:02d}" for k in range(num_members)], member_config=member_config
    )


class EnsembleViTModelTester:
    """ViT's model tester (tests/models/vit), with an `EnsembleConfig` of K tiny ViT members as the config."""

    def __init__(
        self,
        parent,
        batch_size=13,
        image_size=16,
        patch_size=4,
        num_channels=3,
        is_training=True,
        use_labels=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        type_sequence_label_size=10,
        initializer_range=0.02,
        attn_implementation="eager",
        num_members=K,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.use_labels = use_labels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        self.attn_implementation = attn_implementation
        self.num_members = num_members
        self.seq_length = (image_size // patch_size) ** 2 + 1  # patches + [CLS]

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def get_member_config(self) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            is_decoder=False,
            initializer_range=self.initializer_range,
            num_labels=self.type_sequence_label_size,
            architectures=["ViTForImageClassification"],
            attn_implementation=self.attn_implementation,
        )

    def get_config(self) -> EnsembleConfig:
        return _ensemble_config(self.get_member_config(), self.num_members)

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = EnsembleForImageClassification(config).to(torch_device).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))
        self.parent.assertEqual(
            result.member_logits.shape, (self.num_members, self.batch_size, self.type_sequence_label_size)
        )

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class EnsembleBertModelTester:
    """BERT's model tester (tests/models/bert), with an `EnsembleConfig` of K tiny BERT members as config."""

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_token_type_ids=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=16,
        type_sequence_label_size=2,
        initializer_range=0.02,
        num_labels=3,
        num_members=K,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_token_type_ids = use_token_type_ids
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        self.num_labels = num_labels
        self.num_members = num_members

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = (
            random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        )
        token_type_ids = (
            ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
            if self.use_token_type_ids
            else None
        )
        labels = ids_tensor([self.batch_size], self.num_labels) if self.use_labels else None
        return self.get_config(), input_ids, token_type_ids, input_mask, labels

    def get_member_config(self) -> BertConfig:
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            is_decoder=False,
            initializer_range=self.initializer_range,
            num_labels=self.num_labels,
            architectures=["BertForSequenceClassification"],
        )

    def get_config(self) -> EnsembleConfig:
        return _ensemble_config(self.get_member_config(), self.num_members)

    def create_and_check_for_sequence_classification(self, config, input_ids, token_type_ids, mask, labels):
        model = EnsembleForSequenceClassification(config).to(torch_device).eval()
        result = model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertEqual(
            result.member_logits.shape, (self.num_members, self.batch_size, self.num_labels)
        )

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, token_type_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": input_mask,
        }


@not_applicable
class EnsembleViTMembersTest(ModelTesterMixin, unittest.TestCase):
    """An ensemble of ViT image classifiers, with the opt-outs of transformers' ViTModelTest."""

    all_model_classes = (EnsembleForImageClassification,)
    fx_compatible = False
    test_resize_embeddings = False
    test_torch_exportable = True

    def setUp(self):
        self.model_tester = EnsembleViTModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EnsembleConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="ViT does not use inputs_embeds")  # ViTModelTest's own skip
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="ViTModelTest's own skip (CUDA misaligned address since torch 2.3+cu121)")
    def test_multi_gpu_data_parallel_forward(self):
        pass

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(
            *self.model_tester.prepare_config_and_inputs()
        )


@not_applicable
class EnsembleBertMembersTest(ModelTesterMixin, unittest.TestCase):
    """An ensemble of BERT sequence classifiers, with the opt-outs of transformers' BertModelTest."""

    all_model_classes = (EnsembleForSequenceClassification,)
    model_split_percents = [0.5, 0.8, 0.9]

    def setUp(self):
        self.model_tester = EnsembleBertModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EnsembleConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_for_sequence_classification(self):
        self.model_tester.create_and_check_for_sequence_classification(
            *self.model_tester.prepare_config_and_inputs()
        )


class EnsembleBertTokenModelTester(EnsembleBertModelTester):
    """BERT's model tester with K tiny BertForTokenClassification members: labels per token."""

    def prepare_config_and_inputs(self):
        config, input_ids, token_type_ids, input_mask, _ = super().prepare_config_and_inputs()
        labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels) if self.use_labels else None
        return config, input_ids, token_type_ids, input_mask, labels

    def get_member_config(self) -> BertConfig:
        config = super().get_member_config()
        config.architectures = ["BertForTokenClassification"]
        return config

    def create_and_check_for_token_classification(self, config, input_ids, token_type_ids, mask, labels):
        model = EnsembleForTokenClassification(config).to(torch_device).eval()
        result = model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)
        shape = (self.batch_size, self.seq_length, self.num_labels)
        self.parent.assertEqual(result.logits.shape, shape)
        self.parent.assertEqual(result.member_logits.shape, (self.num_members, *shape))
        self.parent.assertTrue(torch.isfinite(result.loss))


@not_applicable
class EnsembleBertTokenMembersTest(ModelTesterMixin, unittest.TestCase):
    """An ensemble of BERT token classifiers, with the opt-outs of transformers' BertModelTest."""

    all_model_classes = (EnsembleForTokenClassification,)
    model_split_percents = [0.5, 0.8, 0.9]

    def setUp(self):
        self.model_tester = EnsembleBertTokenModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EnsembleConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_for_token_classification(self):
        self.model_tester.create_and_check_for_token_classification(
            *self.model_tester.prepare_config_and_inputs()
        )


class EnsembleLlamaModelTester:
    """Llama's model tester (tests/models/llama: transformers' CausalLMModelTester and its defaults), with an
    `EnsembleConfig` of K tiny Llama causal LMs as the config."""

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=37,
        hidden_act="gelu",
        max_position_embeddings=512,
        initializer_range=0.02,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        num_members=K,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.num_members = num_members

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = torch.tril(torch.ones_like(input_ids).to(torch_device)) if self.use_input_mask else None
        token_labels = (
            ids_tensor([self.batch_size, self.seq_length], self.num_labels) if self.use_labels else None
        )
        return self.get_config(), input_ids, input_mask, token_labels

    def get_member_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            architectures=["LlamaForCausalLM"],
        )

    def get_config(self) -> EnsembleConfig:
        return _ensemble_config(self.get_member_config(), self.num_members)

    def create_and_check_for_causal_lm(self, config, input_ids, input_mask, token_labels):
        model = EnsembleModelForCausalLM(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        shape = (self.batch_size, self.seq_length, self.vocab_size)
        self.parent.assertEqual(result.logits.shape, shape)
        self.parent.assertEqual(result.member_logits.shape, (self.num_members, *shape))
        # log of the mean member probability, and the loss is its token NLL
        mean = torch.log_softmax(result.member_logits, -1).exp().mean(0).log()
        torch.testing.assert_close(result.logits, mean)
        nll = torch.nn.functional.cross_entropy(
            mean[:, :-1].reshape(-1, self.vocab_size), token_labels[:, 1:].reshape(-1)
        )
        torch.testing.assert_close(result.loss, nll)

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


@not_applicable
class EnsembleLlamaMembersTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    """An ensemble of Llama causal LMs, with the opt-outs of transformers' LlamaModelTest (CausalLMModelTest).

    ``GenerationTesterMixin`` is the stand-in of `tests/_transformers_common.py` (the sdist does not ship
    tests/generation/): inherited as Llama's test inherits it, it runs no generation test here."""

    all_model_classes = (EnsembleModelForCausalLM,)
    all_generative_model_classes = (EnsembleModelForCausalLM,)
    not_applicable_here = LM_NOT_APPLICABLE
    test_headmasking = False
    test_pruning = False
    # LlamaModelTest: 0.8 instead of 0.9 for test_cpu_offload (edge cases with the causal mask buffer)
    model_split_percents = [0.5, 0.7, 0.8]

    def setUp(self):
        self.model_tester = EnsembleLlamaModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EnsembleConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_for_causal_lm(self):
        self.model_tester.create_and_check_for_causal_lm(*self.model_tester.prepare_config_and_inputs())

    def test_eager_matches_sdpa_logits(self):
        """What transformers' eager-vs-sdpa test checks, on the ensemble's logits (left padding, a mask)."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        mask = torch.ones_like(inputs["input_ids"])
        mask[:, :2] = 0  # left padding
        torch.manual_seed(0)
        eager = EnsembleModelForCausalLM._from_config(
            copy.deepcopy(config), attn_implementation="eager"
        ).eval()
        sdpa = EnsembleModelForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
        sdpa.load_state_dict(eager.state_dict())
        self.assertEqual(eager.config._attn_implementation, "eager")
        self.assertEqual(sdpa.config._attn_implementation, "sdpa")
        with torch.no_grad():
            logits_eager = eager(inputs["input_ids"], attention_mask=mask).logits[:, 2:]
            logits_sdpa = sdpa(inputs["input_ids"], attention_mask=mask).logits[:, 2:]
        torch.testing.assert_close(logits_sdpa, logits_eager, atol=1e-5, rtol=1e-4)

    def test_hidden_states_and_attentions_per_member(self):
        """``output_hidden_states`` / ``output_attentions`` return each member's, as a tuple over members."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.member_config._attn_implementation = "eager"
        model = EnsembleModelForCausalLM(config).eval()
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
            member = model.members[1](**inputs, output_hidden_states=True, output_attentions=True)
        layers = self.model_tester.num_hidden_layers
        self.assertEqual(len(out.hidden_states), K)
        self.assertEqual([len(h) for h in out.hidden_states], [layers + 1] * K)
        self.assertEqual([len(a) for a in out.attentions], [layers] * K)
        torch.testing.assert_close(out.hidden_states[1][-1], member.hidden_states[-1])
        torch.testing.assert_close(out.attentions[1][0], member.attentions[0])
        self.assertIsNone(model(**inputs).hidden_states)

    def test_tp_plan_reaches_members(self):
        """The members' tensor-parallel plan is in the ensemble's, under ``members.*.`` (every member)."""
        model = EnsembleModelForCausalLM(self.model_tester.get_config())
        member_plan = model.members[0].tp_plan
        self.assertTrue(member_plan)
        self.assertEqual(model.tp_plan, {f"members.*.{key}": style for key, style in member_plan.items()})

    def test_inputs_embeds_need_shared_embeddings(self):
        """``inputs_embeds`` go to every member: accepted when the members share their input embeddings (same
        logits as the token ids), refused with the reason when each member has its own table."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = EnsembleModelForCausalLM(config).eval()
        embeds = model.members[0].get_input_embeddings()(inputs["input_ids"])
        with self.assertRaisesRegex(ValueError, "member 1's input embeddings differ"):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        shared = model.members[0].get_input_embeddings().weight
        with torch.no_grad():
            for member in model.members[1:]:
                member.get_input_embeddings().weight.copy_(shared)
            by_ids = model(**inputs).logits
            by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        torch.testing.assert_close(by_embeds, by_ids)


class EnsembleGPT2ModelTester(EnsembleLlamaModelTester):
    """GPT2's model tester (tests/models/gpt2: the same CausalLMModelTester defaults), K tiny GPT2 members:
    the causal-LM family with tied input/output embeddings (Llama's are untied)."""

    def get_member_config(self) -> GPT2Config:
        return GPT2Config(
            vocab_size=self.vocab_size,
            n_embd=self.hidden_size,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_inner=self.intermediate_size,
            activation_function=self.hidden_act,
            n_positions=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            architectures=["GPT2LMHeadModel"],
        )


@not_applicable
class EnsembleGPT2MembersTest(EnsembleLlamaMembersTest):
    """An ensemble of GPT2 causal LMs (tied embeddings); GPT2ModelTest's flags are CausalLMModelTest's (it
    opts out of no common test that runs here)."""

    model_split_percents = [0.5, 0.7, 0.9]  # ModelTesterMixin's default (GPT2ModelTest keeps it)

    def setUp(self):
        super().setUp()
        self.model_tester = EnsembleGPT2ModelTester(self)

    def test_tp_plan_reaches_members(self):
        """GPT2 has no tensor-parallel plan: nor has the ensemble."""
        self.assertEqual(EnsembleModelForCausalLM(self.model_tester.get_config()).tp_plan, {})
