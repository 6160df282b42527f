"""Model cards rendered from model_cards/ensemble_card.md through huggingface_hub's ModelCard."""

from huggingface_hub import ModelCard

from hf_ens.cards import render_model_card, template_path

METADATA = {
    "method": "starsse",
    "num_members": 4,
    "learning_rate": 1e-4,
    "num_train_epochs": 3.0,
    "cycle_epochs": 2.0,
    "cycle_learning_rate": 5e-4,
    "cycle_warmup_steps": 0.1,
    "base_model": "google/vit-base-patch16-224-in21k",
    "dataset": "cifar10",
    "dataset_split": "test",
    "seed": 42,
    "reset_optimizer": True,
    "cycle_steps": 120,
    "model1_steps": None,
}
METRICS = {
    "ensemble/accuracy": 0.9712,
    "ensemble/nll": 0.1034,
    "ensemble/ece": 0.012,
    "ensemble/brier": 0.045,
    "soup/accuracy": 0.9655,
    "soup/nll": 0.121,
    "greedy_soup/accuracy": 0.97,
    "member_mean/accuracy": 0.961,
    "member_mean/nll": 0.14,
    "member_mean/ece": 0.02,
    "member_mean/brier": 0.06,
    "diversity/disagreement": 0.031,
    "diversity/kl_to_ensemble": 0.0123,
}


def test_template_found_in_source_tree():
    assert template_path().is_file() and template_path().parent.name == "model_cards"


def test_card_metadata_and_model_index():
    vit = {"architecture": "ViTForImageClassification"}
    card = render_model_card(METADATA, METRICS, repo_id="user/vit-cifar10-starsse", ensemble_config=vit)
    reparsed = ModelCard(str(card))  # what the Hub would parse
    data = reparsed.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model"] == "google/vit-base-patch16-224-in21k"
    assert data["datasets"] == ["cifar10"]
    assert {"hf-ens", "ensemble", "model-soup", "starsse"} <= set(data["tags"])
    assert data["pipeline_tag"] == "image-classification"
    index = data["model-index"][0]
    assert index["name"] == "user/vit-cifar10-starsse"
    metrics = {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert metrics["ensemble accuracy"] == 0.9712 and metrics["uniform soup accuracy"] == 0.9655
    assert metrics["ensemble brier"] == 0.045 and "uniform soup brier" not in metrics
    assert metrics["greedy soup accuracy"] == 0.97
    assert index["results"][0]["dataset"]["split"] == "test"


def test_card_task_is_the_members_never_a_guess():
    """A text ensemble is tagged text-classification (and its problem type); an unknown architecture gets no
    pipeline tag at all (it used to be called image-classification whatever it was)."""
    text = {"architecture": "LlamaForSequenceClassification", "problem_type": "multi_label_classification"}
    data = ModelCard(str(render_model_card(METADATA, METRICS, "user/x", ensemble_config=text))).data.to_dict()
    assert data["pipeline_tag"] == "text-classification"
    assert {"text-classification", "multi-label-classification"} <= set(data["tags"])
    assert data["model-index"][0]["results"][0]["task"]["type"] == "text-classification"
    card = render_model_card(METADATA, METRICS, "user/x")  # nothing says what the members are
    data = ModelCard(str(card)).data.to_dict()
    assert "pipeline_tag" not in data and "image-classification" not in str(card)


def test_card_body_has_table_hyperparameters_and_snippets():
    text = render_model_card(
        METADATA,
        METRICS,
        repo_id="user/vit-cifar10-starsse",
        ensemble_config={"architecture": "ViTForImageClassification"},
    ).text
    assert "| ensemble | 0.9712 | 0.1034 | 0.0120 | 0.0450 |" in text
    assert "| uniform soup | 0.9655 | 0.1210 | - | - |" in text
    assert "| greedy soup | 0.9700 | - | - | - |" in text
    assert "| mean member | 0.9610 | 0.1400 | 0.0200 | 0.0600 |" in text
    assert "| cycle_learning_rate | 0.0005 |" in text and "| cycle_epochs | 2 |" in text
    assert "| learning_rate | 0.0001 |" in text and "| method | starsse |" in text
    assert "| reset_optimizer | True |" in text and "| cycle_steps | 120 |" in text  # extra metadata too
    assert "disagreement = 0.0310" in text
    assert 'EnsembleModel.from_pretrained("user/vit-cifar10-starsse")' in text
    assert 'AutoModelForImageClassification.from_pretrained("user/vit-cifar10-starsse")' in text
    assert 'subfolder="member_00"' in text and "member_03/" in text
    assert "StarSSE" in text and "`ViTForImageClassification`" in text


def test_card_without_metrics_or_dataset():
    card = render_model_card({"method": "local_de", "num_members": 2}, None, None)
    assert "model-index" not in card.data.to_dict()
    assert "## Evaluation" not in card.text and "Local DE" in card.text


def test_local_and_offline_sources_are_described_not_linked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "pretrained").mkdir(parents=True)
    for base_model, name in [
        ("~/.cache/hf_ens/pretrained/vit-fmnist-0123abcd", "vit-fmnist-0123abcd"),
        (str(tmp_path / "ckpt" / "vit-small"), "vit-small"),
        ("out/pretrained", "pretrained"),  # relative, but it exists here: a local checkpoint
        ("local:vit-fmnist-0123abcd", "vit-fmnist-0123abcd"),  # as ensemble_config.json stores it
    ]:
        card = render_model_card(
            {**METADATA, "base_model": base_model, "dataset": "offline:fashion_mnist"}, METRICS, "user/x"
        )
        data = ModelCard(str(card)).data.to_dict()
        assert "base_model" not in data and "datasets" not in data and "model-index" not in data
        assert f"start from\na local checkpoint (`{name}`)" in card.text
        assert f"| base_model | a local checkpoint (`{name}`) |" in card.text
        # one parenthesis (it read "(not from the Hub) (test split)")
        assert (
            "## Evaluation on an offline copy of `fashion_mnist` (not from the Hub; test split)" in card.text
        )
        assert "huggingface.co/~" not in card.text and "huggingface.co/local" not in card.text
        assert str(tmp_path) not in str(card) and "/.cache" not in str(card) and "~" not in str(card)


def test_hub_ids_are_linked():
    card = render_model_card(METADATA, METRICS, "user/x")
    assert (
        "[`google/vit-base-patch16-224-in21k`](https://huggingface.co/google/vit-base-patch16-224-in21k)"
        in (card.text)
    )
    assert "## Evaluation on `cifar10` (test split)" in card.text


def test_class_subset_and_probe_errors_read_as_a_person_writes_them():
    probe = {
        "table": [
            {"multiplier": 1.0, "learning_rate": 1e-3, "loss_barrier": 0.01, "eval_loss": 0.6,
             "eval_error": 0.2, "in_basin": True, "chosen": True},
            {"multiplier": 2.0, "learning_rate": 2e-3, "loss_barrier": 0.3, "eval_loss": 1.2,
             "eval_error": 0.41234, "in_basin": False, "chosen": False},
        ],
        "model1": {"eval_loss": 0.5587, "eval_error": 0.184},
        "chosen_multiplier": 1.0, "cycle_learning_rate": 1e-3, "basin_tolerance": 0.1,
    }  # fmt: skip
    names = ["Dress", "Coat", "Shirt", "Sneaker", "Ankle boot"]
    metadata = {
        **METADATA,
        "dataset": "offline:fashion_mnist",
        "dataset_classes": names,
        "basin_probe": probe,
    }
    card = render_model_card(metadata, METRICS, "user/x").text
    heading = (
        "## Evaluation on an offline copy of `fashion_mnist` (not from the Hub; test split; "
        "a 5-class subset: Dress, Coat, Shirt, Sneaker, Ankle boot)"
    )
    assert heading in card
    assert "error 18.40%" in card and "18.4000" not in card  # it printed "error 18.4000%"
    assert "| 41.23 |" in card
    assert "dataset_classes" not in card  # not a hyper-parameter
