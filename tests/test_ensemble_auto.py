"""The ensemble as a first-class transformers model (issue 10.1): EnsembleConfig, Auto classes, pipelines
without a "not supported" message, transformers' keywords on from_pretrained, save_pretrained, push_to_hub."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from hf_ens import (
    EnsembleConfig,
    EnsembleForImageClassification,
    EnsembleForSequenceClassification,
    EnsembleLoadError,
    EnsembleModel,
)
from hf_ens.metrics import compute_metrics
from hf_ens.testing_utils import tiny_bert, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = "test-user/tiny-ensemble"


@pytest.fixture
def processor():
    return ViTImageProcessor(size={"height": 16, "width": 16})


@pytest.fixture
def ens(processor):
    members = [tiny_vit(s, id2label={0: "cat", 1: "dog", 2: "owl"}) for s in range(3)]
    return EnsembleModel.from_members(members, processor=processor, metadata={"method": "starsse"})


@pytest.fixture
def saved(ens, tmp_path):
    return ens.save_pretrained(tmp_path / "ens")


@pytest.fixture
def transformers_log():
    """Every record transformers logs at WARNING or above during the test (they do not reach caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")) for _ in range(n)]


def _probs(model, processor, images) -> torch.Tensor:
    with torch.no_grad():
        return model(**processor(images, return_tensors="pt")).logits.softmax(-1)


def _pipeline_probs(pipe, images, id2label) -> torch.Tensor:
    label2id = {v: k for k, v in id2label.items()}
    out = torch.zeros(len(images), len(id2label), dtype=torch.float64)
    for i, result in enumerate(pipe(images, top_k=len(id2label))):
        for r in result:
            out[i, label2id[r["label"]]] = r["score"]
    return out


def test_config_roundtrip_and_auto_from_config(ens, saved):
    cfg = EnsembleConfig.from_pretrained(saved)
    assert cfg.model_type == "hf_ens_ensemble" and cfg.members == ["member_00", "member_01", "member_02"]
    assert isinstance(cfg.member_config, ViTConfig) and cfg.member_config.hidden_size == 32
    assert cfg.id2label == {0: "cat", 1: "dog", 2: "owl"} and cfg.num_labels == 3
    assert cfg.metadata["method"] == "starsse" and len(cfg.files) >= 7
    assert type(AutoConfig.from_pretrained(saved / "ensemble_config.json")) is EnsembleConfig
    # the root config.json is still the soup's
    assert type(AutoConfig.from_pretrained(saved)) is ViTConfig
    fresh = AutoModelForImageClassification.from_config(cfg)
    assert type(fresh) is EnsembleForImageClassification and fresh.num_members == 3
    assert all(type(m) is ViTForImageClassification for m in fresh.members)
    assert not torch.equal(fresh.members[0].classifier.weight, fresh.members[1].classifier.weight)
    text = EnsembleModel.from_members([tiny_bert(0), tiny_bert(1)])
    assert type(text) is EnsembleForSequenceClassification
    assert (
        type(AutoModelForSequenceClassification.from_config(text.config)) is EnsembleForSequenceClassification
    )
    with pytest.raises(TypeError, match="EnsembleConfig"):
        EnsembleModel(ViTConfig())


def test_trained_members_keep_their_weights_through_post_init(ens):
    x = torch.randn(2, 3, 16, 16)
    members = [tiny_vit(s, id2label={0: "cat", 1: "dog", 2: "owl"}) for s in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(ens.members[1](pixel_values=x).logits, members[1](pixel_values=x).logits)


def test_pipelines_give_ensemble_predictions_without_not_supported_message(
    ens, saved, processor, transformers_log
):
    images = _images()
    expected = _probs(ens, processor, images).double()
    by_model = pipeline("image-classification", model=ens, image_processor=processor)
    loaded = EnsembleModel.from_pretrained(saved)
    by_dir = pipeline("image-classification", model=loaded, image_processor=loaded.processor)
    for pipe in (by_model, by_dir):
        torch.testing.assert_close(
            _pipeline_probs(pipe, images, ens.config.id2label), expected, atol=1e-6, rtol=0
        )
    assert not [r.getMessage() for r in transformers_log], "transformers logged warnings"
    # a repo string gives the root soup, as it does without hf-ens (pipelines read the root config.json; a
    # `config=EnsembleConfig` is not used to pick the model class)
    soup = pipeline("image-classification", model=str(saved), config=EnsembleConfig.from_pretrained(saved))
    assert type(soup.model) is ViTForImageClassification
    torch.testing.assert_close(
        _pipeline_probs(soup, images, ens.config.id2label),
        _probs(ens.soup(), processor, images).double(),
        atol=1e-6,
        rtol=0,
    )


def test_text_pipeline_is_quiet(tmp_path, transformers_log):
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"])
    )
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    ens = EnsembleModel.from_members([tiny_bert(0), tiny_bert(1)], processor=tokenizer)
    pipe = pipeline("text-classification", model=ens, tokenizer=tokenizer, top_k=None)
    with torch.no_grad():
        probs = ens(**tokenizer("good bad", return_tensors="pt")).logits.softmax(-1)[0]
    got = {r["label"]: r["score"] for r in pipe(["good bad"])[0]}
    assert got == pytest.approx({ens.config.id2label[i]: p.item() for i, p in enumerate(probs)}, abs=1e-6)
    assert not [r.getMessage() for r in transformers_log]


def test_auto_pipeline_trainer_and_model_agree(ens, saved, processor, tmp_path):
    """Acceptance of issue 10: Auto, pipeline, Trainer.evaluate and EnsembleModel agree on a tiny ensemble."""
    from datasets import Dataset

    images = _images(6)
    labels = np.array([0, 1, 2, 1, 0, 2])
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    direct = EnsembleModel.from_pretrained(saved)
    cfg = EnsembleConfig.from_pretrained(saved)
    auto = AutoModelForImageClassification.from_pretrained(saved, config=cfg)
    assert type(auto) is type(direct) is EnsembleForImageClassification
    with torch.no_grad():
        p_direct = direct(pixel_values=pixel_values).logits.softmax(-1).double()
        p_auto = auto(pixel_values=pixel_values).logits.softmax(-1).double()
    pipe = pipeline("image-classification", model=direct, image_processor=direct.processor)
    p_pipe = _pipeline_probs(pipe, images, ens.config.id2label)
    ds = Dataset.from_dict({"pixel_values": pixel_values.numpy(), "labels": labels}).with_format("torch")
    args = TrainingArguments(str(tmp_path / "t"), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    metrics = Trainer(model=auto, args=args, eval_dataset=ds, compute_metrics=compute_metrics).evaluate()
    nll_direct = -np.log(p_direct.numpy()[np.arange(6), labels]).mean()
    torch.testing.assert_close(p_auto, p_direct, atol=1e-6, rtol=0)
    torch.testing.assert_close(p_pipe, p_direct, atol=1e-6, rtol=0)
    assert metrics["eval_nll"] == pytest.approx(nll_direct, abs=1e-6)
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(p_direct.numpy().argmax(-1) == labels), abs=1e-6)


def test_from_pretrained_keywords(ens, saved):
    x = torch.randn(2, 3, 16, 16)
    expected = ens(pixel_values=x).logits.detach()
    with pytest.warns(UserWarning, match="revision='main' ignored"):
        loaded = EnsembleModel.from_pretrained(saved, revision="main")
    torch.testing.assert_close(loaded(pixel_values=x).logits, expected)
    for kwargs in ({"device_map": "cpu"}, {"device_map": "auto"}, {"device_map": torch.device("cpu")}):
        loaded = EnsembleModel.from_pretrained(saved, **kwargs)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected)
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": torch.bfloat16}, {"dtype": "bfloat16"}):
        assert {p.dtype for p in EnsembleModel.from_pretrained(saved, **kwargs).parameters()} == {
            torch.bfloat16
        }
    assert not EnsembleModel.from_pretrained(saved).training
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['num_lables'\]"):
        EnsembleModel.from_pretrained(saved, num_lables=3)
    with pytest.raises(ValueError, match="never runs repository code"):
        EnsembleModel.from_pretrained(saved, trust_remote_code=True)
    with pytest.raises(ValueError, match="safetensors"):
        EnsembleModel.from_pretrained(saved, use_safetensors=False)
    with pytest.raises(ValueError, match="disagree"):
        EnsembleModel.from_pretrained(saved, dtype=torch.float16, torch_dtype=torch.bfloat16)
    other = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)]).config
    with pytest.raises(EnsembleLoadError, match="lists members"):
        EnsembleModel.from_pretrained(saved, config=other)


def test_format_1_repo_still_loads(ens, saved):
    """Repos saved before EnsembleConfig: their ensemble_config.json has no member config."""
    cfg = json.loads((saved / "ensemble_config.json").read_text())
    old = {k: cfg[k] for k in ("members", "num_members", "architecture", "root_weights", "metadata", "files")}
    old.update(hf_ens_format_version=1, model_type="vit")
    (saved / "ensemble_config.json").write_text(json.dumps(old))
    loaded = EnsembleModel.from_pretrained(saved)
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "owl"} and loaded.metadata["method"] == "starsse"
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(pixel_values=x).logits, ens(pixel_values=x).logits.detach())


def test_save_keywords(ens, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        ens.save_pretrained(tmp_path / "a", safe_serialization=False)
    with pytest.raises(ValueError, match="safetensors only"):
        ens.push_to_hub(REPO, safe_serialization=False)
    with pytest.raises(ValueError, match="state_dict"):
        ens.save_pretrained(tmp_path / "a", state_dict=ens.state_dict())
    with pytest.raises(TypeError, match="variant"):
        ens.save_pretrained(tmp_path / "a", variant="fp16")
    ens.save_pretrained(tmp_path / "a", is_main_process=False)  # another rank: writes nothing
    assert not (tmp_path / "a").exists()


def test_max_shard_size_shards_members_and_soup_and_loads_back(ens, tmp_path):
    saved = ens.save_pretrained(tmp_path / "ens", max_shard_size="40KB")
    for folder in (saved, saved / "member_01"):
        shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
        assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
        assert not (folder / "model.safetensors").exists()
    files = json.loads((saved / "ensemble_config.json").read_text())["files"]
    assert {f"member_01/{s.name}" for s in (saved / "member_01").glob("model-*.safetensors")} <= set(files)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            EnsembleModel.from_pretrained(saved)(pixel_values=x).logits, ens(pixel_values=x).logits
        )
        soup = AutoModelForImageClassification.from_pretrained(saved)
        torch.testing.assert_close(soup(pixel_values=x).logits, ens.soup()(pixel_values=x).logits)
    shard = sorted((saved / "member_01").glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(EnsembleLoadError, match=rf"member_01[/\\]{shard.name}.*SHA-256"):
        EnsembleModel.from_pretrained(saved)


def test_push_keywords_reach_the_hub(hub, ens, tmp_path):
    api = HfApi()
    ens.push_to_hub(
        REPO, commit_message="StarSSE, 3 members", commit_description="cycle 2 epochs", private=True
    )
    head = api.list_repo_commits(REPO)[0]
    assert head.title == "StarSSE, 3 members" and head.message == "cycle 2 epochs"
    assert api.model_info(REPO).private
    main_before = head.commit_id

    two = EnsembleModel.from_members(list(ens.members)[:2], processor=ens.processor)
    info = two.push_to_hub(REPO, create_pr=True, commit_message="two members", max_shard_size="40KB")
    assert info.pr_revision == "refs/pr/1"
    assert api.list_repo_commits(REPO)[0].commit_id == main_before  # main untouched
    assert EnsembleModel.from_pretrained(REPO).num_members == 3
    from_pr = EnsembleModel.from_pretrained(REPO, revision="refs/pr/1", cache_dir=tmp_path / "cache")
    assert from_pr.num_members == 2
    assert any(f.startswith("member_01/model-") for f in api.list_repo_files(REPO, revision="refs/pr/1"))
    assert list((tmp_path / "cache").rglob("member_01/model.safetensors.index.json"))

    # the files are in cache_dir: loading again needs no Hub
    hub.stop()
    offline = EnsembleModel.from_pretrained(
        REPO, revision="refs/pr/1", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert offline.num_members == 2
    hub.start()

    two.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id=REPO, commit_message="via save")
    assert api.list_repo_commits(REPO)[0].title == "via save"
    cfg = EnsembleConfig.from_pretrained(REPO)
    assert cfg.members == ["member_00", "member_01"] and cfg.id2label == ens.config.id2label
    auto = AutoModelForImageClassification.from_pretrained(REPO, config=cfg)
    assert type(auto) is EnsembleForImageClassification and auto.num_members == 2
    pipe = pipeline("image-classification", model=auto, image_processor=auto.processor)
    images = _images(2)
    torch.testing.assert_close(
        _pipeline_probs(pipe, images, ens.config.id2label),
        _probs(two, ens.processor, images).double(),
        atol=1e-6,
        rtol=0,
    )
