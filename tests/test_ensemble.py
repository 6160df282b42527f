"""EnsembleModel with tiny real models: maths, errors, save/load layout, strict loading, pipeline, Trainer."""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTImageProcessor,
    pipeline,
)

from hf_ens import EnsembleLoadError, EnsembleModel, uniform_soup
from hf_ens.metrics import compute_metrics, ensemble_log_probs
from hf_ens.testing_utils import tiny_bert, tiny_resnet, tiny_vit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def vits():
    return [tiny_vit(s) for s in range(3)]


@pytest.fixture
def processor():
    return ViTImageProcessor(size={"height": 16, "width": 16})


METADATA = {
    "method": "starsse",
    "learning_rate": 1e-4,
    "cycle_epochs": 2.0,
    "base_model": "tiny/vit",
    "seed": 0,
}


def test_logits_are_log_mean_probabilities(vits):
    ens = EnsembleModel.from_members(vits)
    x = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        out = ens(pixel_values=x, labels=labels)
        z = [m(pixel_values=x).logits for m in vits]
    assert out.member_logits.shape == (3, 4, 3) and out.logits.shape == (4, 3)
    for k in range(3):
        torch.testing.assert_close(out.member_logits[k], z[k])
    mean_p = np.mean([torch.softmax(zk, -1).numpy() for zk in z], axis=0)
    np.testing.assert_allclose(out.logits.exp().numpy(), mean_p, rtol=1e-5)
    expected_loss = -np.mean(np.log(mean_p[np.arange(4), labels.numpy()]))
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert ens.num_members == 3 and ens.config.num_labels == 3 and ens.main_input_name == "pixel_values"
    assert ens.metadata["num_members"] == 3
    loss, logits, member_logits = ens(pixel_values=x, labels=labels, return_dict=False)
    torch.testing.assert_close(logits, out.logits)


def test_sequence_classification_members():
    berts = [tiny_bert(s) for s in range(2)]
    ens = EnsembleModel.from_members(berts)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = ens(input_ids=ids, attention_mask=mask)
        p = [torch.softmax(b(input_ids=ids, attention_mask=mask).logits, -1) for b in berts]
    torch.testing.assert_close(out.logits.exp(), (p[0] + p[1]) / 2)
    assert ens.main_input_name == "input_ids"


def test_incompatible_members_raise_clear_errors(vits):
    with pytest.raises(ValueError, match="one architecture"):
        EnsembleModel.from_members([vits[0], tiny_bert(0)])
    other_labels = tiny_vit(5, num_labels=4)
    with pytest.raises(ValueError, match="label set"):
        EnsembleModel.from_members([vits[0], other_labels])
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleModel.from_members([])
    with pytest.raises(TypeError, match="PreTrainedModel"):
        EnsembleModel.from_members([vits[0], torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="ForImageClassification"):
        EnsembleModel.from_members([vits[0].vit])


def test_save_load_roundtrip_and_layout(vits, processor, tmp_path):
    ens = EnsembleModel.from_members(vits, processor=processor, metadata=METADATA)
    target = ens.save_pretrained(tmp_path / "ens")
    names = sorted(p.name for p in target.iterdir())
    assert names == [
        "README.md",
        "config.json",
        "ensemble_config.json",
        "member_00",
        "member_01",
        "member_02",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    cfg = json.loads((target / "ensemble_config.json").read_text())
    assert cfg["members"] == ["member_00", "member_01", "member_02"] and cfg["num_members"] == 3
    assert cfg["metadata"]["method"] == "starsse" and cfg["metadata"]["base_model"] == "tiny/vit"
    assert not any(p.name.startswith(".ens") for p in tmp_path.iterdir())  # no temp dir left behind

    x = torch.randn(2, 3, 16, 16)
    loaded = EnsembleModel.from_pretrained(target)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, ens(pixel_values=x).logits)
        # a member and the root soup load with plain transformers
        member = AutoModelForImageClassification.from_pretrained(target, subfolder="member_02")
        torch.testing.assert_close(member(pixel_values=x).logits, vits[2](pixel_values=x).logits)
        soup = AutoModelForImageClassification.from_pretrained(target)
        torch.testing.assert_close(soup(pixel_values=x).logits, uniform_soup(vits)(pixel_values=x).logits)
    assert isinstance(loaded.processor, type(processor)) or loaded.processor.size == processor.size
    assert loaded.metadata["method"] == "starsse"

    # saving again replaces the ensemble's files (stale member_02 goes), keeps unrelated files
    (target / "notes.txt").write_text("mine")
    EnsembleModel.from_members(vits[:2]).save_pretrained(target)
    assert sorted(p.name for p in target.glob("member_*")) == ["member_00", "member_01"]
    assert (target / "notes.txt").read_text() == "mine"
    assert EnsembleModel.from_pretrained(target).num_members == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ens"]
    again = EnsembleModel.from_members([target / "member_00", target / "member_01"])
    assert again.num_members == 2
    with pytest.raises(ValueError, match="local directory"):
        EnsembleModel.from_pretrained(target, revision="v1")


def test_failed_save_leaves_previous_directory_intact(vits, tmp_path, monkeypatch):
    target = EnsembleModel.from_members(vits).save_pretrained(tmp_path / "ens")
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    soup = uniform_soup(vits[:2])

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(soup, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        EnsembleModel.from_members(vits[:2]).save_pretrained(target, soup=soup)
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ens"]


@pytest.fixture
def saved(vits, tmp_path):
    return EnsembleModel.from_members(vits).save_pretrained(tmp_path / "ens")


def test_missing_member_file_names_the_file(saved):
    (saved / "member_01" / "model.safetensors").unlink()
    with pytest.raises(EnsembleLoadError, match=r"member_01[/\\]model\.safetensors"):
        EnsembleModel.from_pretrained(saved)


def test_corrupted_member_file_names_the_file(saved):
    path = saved / "member_02" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EnsembleLoadError, match=r"member_02[/\\]model\.safetensors"):
        EnsembleModel.from_pretrained(saved)


def _drop_digests(saved):
    """Make `saved` look like a repo written before file digests were recorded (loads unverified)."""
    cfg = json.loads((saved / "ensemble_config.json").read_text())
    del cfg["files"]
    (saved / "ensemble_config.json").write_text(json.dumps(cfg))


def test_missing_and_unexpected_weights_are_errors(saved):
    _drop_digests(saved)  # the strict member check itself, behind the digest check
    path = saved / "member_00" / "model.safetensors"
    state = load_file(path)
    dropped = next(k for k in state if k.endswith("classifier.weight"))
    save_file({k: v for k, v in state.items() if k != dropped}, path, metadata={"format": "pt"})
    with pytest.raises(EnsembleLoadError, match="missing_keys.*classifier"):
        EnsembleModel.from_pretrained(saved)
    save_file({**state, "extra.weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(EnsembleLoadError, match="unexpected_keys.*extra.weight"):
        EnsembleModel.from_pretrained(saved)


def test_member_count_must_match_ensemble_config(saved):
    cfg = json.loads((saved / "ensemble_config.json").read_text())
    cfg["members"] = cfg["members"][:2]
    (saved / "ensemble_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EnsembleLoadError, match="lists 2 members"):
        EnsembleModel.from_pretrained(saved)
    (saved / "ensemble_config.json").unlink()
    with pytest.raises(EnsembleLoadError, match="ensemble_config.json"):
        EnsembleModel.from_pretrained(saved)


def test_pickle_weights_are_never_loaded(saved):
    member = saved / "member_01"
    torch.save(load_file(member / "model.safetensors"), member / "pytorch_model.bin")
    (member / "model.safetensors").unlink()
    with pytest.raises(EnsembleLoadError, match="safetensors"):
        EnsembleModel.from_pretrained(saved)


def test_image_classification_pipeline_gives_ensemble_probabilities(vits, processor):
    from PIL import Image

    ens = EnsembleModel.from_members(vits, processor=processor)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8"))
    pipe = pipeline("image-classification", model=ens, image_processor=processor)
    result = pipe(image, top_k=3)
    with torch.no_grad():
        x = processor(image, return_tensors="pt")["pixel_values"]
        probs = ens(pixel_values=x).logits.softmax(-1)[0]
    expected = {ens.config.id2label[i]: p.item() for i, p in enumerate(probs)}
    assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, rel=1e-5)


def test_trainer_evaluate_reports_ensemble_metrics(vits, tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3, 16, 16)).astype("float32")
    y = rng.integers(0, 3, 10)
    ds = Dataset.from_dict({"pixel_values": x, "labels": y}).with_format("torch")
    ens = EnsembleModel.from_members(vits)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(model=ens, args=args, eval_dataset=ds, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    with torch.no_grad():
        member_logits = torch.stack([m(pixel_values=torch.from_numpy(x)).logits for m in vits])
    log_p = ensemble_log_probs(member_logits).numpy()
    expected_nll = -np.mean(log_p[np.arange(10), y])
    assert metrics["eval_nll"] == pytest.approx(expected_nll, rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(expected_nll, rel=1e-4)
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(log_p.argmax(-1) == y))
    assert math.isfinite(metrics["eval_ece"]) and math.isfinite(metrics["eval_brier"])
    # Trainer.save_model writes the ensemble layout next to the Trainer's own files
    trainer.save_model(str(tmp_path / "saved"))
    assert EnsembleModel.from_pretrained(tmp_path / "saved").num_members == 3
    assert (tmp_path / "saved" / "training_args.bin").is_file()


def test_predict_collects_member_logits(vits):
    ens = EnsembleModel.from_members(vits)
    batches = [{"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])} for _ in range(2)]
    member_logits, labels = ens.predict(batches)
    assert member_logits.shape == (3, 4, 3) and labels.tolist() == [0, 1, 0, 1]


def test_soup_of_batchnorm_ensemble_warns(tmp_path):
    members = [tiny_resnet(s) for s in range(2)]
    with pytest.warns(UserWarning, match="BatchNorm"):
        EnsembleModel.from_members(members).soup()


def test_text_ensemble_with_tokenizer_roundtrip_and_pipeline(tmp_path):
    from transformers import BertTokenizerFast

    words = ["good", "bad", "movie", "plot", "great", "awful"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    berts = [tiny_bert(s) for s in range(2)]
    ens = EnsembleModel.from_members(berts, processor=tokenizer, metadata={"method": "local_de"})
    loaded = EnsembleModel.from_pretrained(ens.save_pretrained(tmp_path / "ens"))
    assert loaded.processor("good movie")["input_ids"] == tokenizer("good movie")["input_ids"]
    text = "great plot awful movie"
    result = pipeline("text-classification", model=loaded, tokenizer=loaded.processor, top_k=None)([text])[0]
    with torch.no_grad():
        probs = ens(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
    expected = {ens.config.id2label[i]: p.item() for i, p in enumerate(probs)}
    assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, rel=1e-5)


def test_load_in_bf16(saved):
    ens = EnsembleModel.from_pretrained(saved, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ens.parameters())
    with torch.no_grad():
        out = ens(pixel_values=torch.randn(2, 3, 16, 16, dtype=torch.bfloat16))
    assert out.member_logits.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(2))


def test_corrupted_member_config_names_the_file(saved):
    (saved / "member_01" / "config.json").write_text("{not json")
    with pytest.raises(EnsembleLoadError, match=r"member_01[/\\]config\.json"):
        EnsembleModel.from_pretrained(saved)


def test_loading_a_recipe_output_dir_points_at_its_repo_folder(tmp_path):
    """`EnsembleModel.from_pretrained("outputs/offline_starsse")` names the ensemble_repo/ inside it."""
    (tmp_path / "ensemble_repo").mkdir()
    (tmp_path / "ensemble_repo" / "ensemble_config.json").write_text("{}")
    with pytest.raises(
        EnsembleLoadError, match=r"not an hf-ens ensemble; .*ensemble_repo is one: load that folder"
    ):
        EnsembleModel.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnsembleLoadError, match=r"see EnsembleModel\.save_pretrained"):
        EnsembleModel.from_pretrained(tmp_path / "empty")


def test_inputs_embeds_reach_the_members_only_when_they_share_their_embeddings():
    """``inputs_embeds``: vectors of one table. With members of their own tables every member would read
    member 0's vectors (a silently wrong ensemble): refused. One shared table gives input_ids' result."""
    ids = torch.tensor([[1, 5, 7, 2], [3, 4, 9, 2]])
    own = EnsembleModel.from_members([tiny_bert(0), tiny_bert(1)]).eval()
    embeds = own.members[0].get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="member 1's input embeddings differ"):
        own(inputs_embeds=embeds)
    a, b = tiny_bert(0), tiny_bert(1)
    b.set_input_embeddings(a.get_input_embeddings())  # one table, as adapters on one base have
    shared = EnsembleModel.from_members([a, b]).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            shared(inputs_embeds=shared.members[0].get_input_embeddings()(ids)).logits,
            shared(input_ids=ids).logits,
        )
