"""uniform_soup / greedy_soup / recompute_batchnorm on tiny real models, against hand-computed values."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertForMaskedLM, ViTForImageClassification

from hf_ens import greedy_soup, make_accuracy_eval_fn, recompute_batchnorm, uniform_soup
from tests._tiny import random_images, tiny_bert_config, tiny_resnet, tiny_vit


def test_uniform_soup_is_the_mean_of_every_weight():
    members = [tiny_vit(s) for s in range(3)]
    soup = uniform_soup(members)
    assert type(soup) is ViTForImageClassification and soup is not members[0]
    states = [m.state_dict() for m in members]
    for name, value in soup.state_dict().items():
        torch.testing.assert_close(value, (states[0][name] + states[1][name] + states[2][name]) / 3)
    # members untouched
    torch.testing.assert_close(members[0].state_dict()["classifier.weight"], tiny_vit(0).classifier.weight)


def test_soup_of_member_directories(tmp_path):
    members = [tiny_vit(s) for s in range(2)]
    paths = []
    for k, m in enumerate(members):
        m.save_pretrained(tmp_path / f"member_{k:02d}")
        paths.append(tmp_path / f"member_{k:02d}")
    from_dirs = uniform_soup([str(paths[0]), paths[1]])
    torch.testing.assert_close(from_dirs.state_dict(), uniform_soup(members).state_dict())


def test_bf16_members_are_accumulated_in_fp32():
    members = [tiny_vit(s).to(torch.bfloat16) for s in range(3)]
    soup = uniform_soup(members)
    w = [m.classifier.weight for m in members]
    expected = ((w[0].float() + w[1].float() + w[2].float()) / 3).to(torch.bfloat16)
    assert soup.classifier.weight.dtype == torch.bfloat16
    assert torch.equal(soup.classifier.weight, expected)


def test_integer_buffers_copied_from_member_zero_and_bn_warning():
    members = [tiny_resnet(s) for s in range(2)]
    bn = [m.resnet.embedder.embedder.normalization for m in members]
    bn[0].num_batches_tracked.fill_(7)
    bn[1].num_batches_tracked.fill_(100)
    with pytest.warns(UserWarning, match="BatchNorm.*recompute_batchnorm"):
        soup = uniform_soup(members)
    assert soup.resnet.embedder.embedder.normalization.num_batches_tracked.item() == 7
    assert soup.resnet.embedder.embedder.normalization.num_batches_tracked.dtype == torch.long
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uniform_soup([tiny_vit(0), tiny_vit(1)])  # no BatchNorm: no warning


def test_tied_weights_stay_tied_and_averaged_once():
    cfg = tiny_bert_config(vocab_size=40)
    members = []
    for s in range(2):
        torch.manual_seed(s)
        members.append(BertForMaskedLM(cfg))
    assert members[0].cls.predictions.decoder.weight is members[0].bert.embeddings.word_embeddings.weight
    soup = uniform_soup(members)
    emb = soup.bert.embeddings.word_embeddings.weight
    assert soup.cls.predictions.decoder.weight is emb
    w = [m.bert.embeddings.word_embeddings.weight for m in members]
    torch.testing.assert_close(emb, (w[0] + w[1]) / 2)


def test_soup_rejects_mismatched_members():
    with pytest.raises(ValueError, match="different architectures"):
        uniform_soup([tiny_vit(0), tiny_resnet(0)])
    with pytest.raises(ValueError, match="empty"):
        uniform_soup([])


def _resnet_loader(n_batches: int = 3) -> DataLoader:
    x, y = random_images(n_batches * 4)
    return DataLoader(TensorDataset(x * 2 + 1, y), batch_size=4)


def test_recompute_batchnorm_gives_the_exact_average_of_batch_statistics():
    soup = uniform_soup([tiny_resnet(0), tiny_resnet(1)], warn_batchnorm=False)
    bn = soup.resnet.embedder.embedder.normalization
    seen = []
    handle = bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    loader = _resnet_loader()
    recompute_batchnorm(soup, loader)
    handle.remove()
    assert len(seen) == 3
    # cumulative average (momentum=None) of the per-batch means / unbiased variances
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    expected_var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert bn.momentum == 0.1 and not soup.training and not bn.training  # momentum and modes restored
    with pytest.raises(ValueError, match="empty"):
        recompute_batchnorm(soup, [])


def test_uniform_soup_with_loader_recomputes_bn():
    members = [tiny_resnet(0), tiny_resnet(1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soup = uniform_soup(members, bn_dataloader=_resnet_loader())
    bn = soup.resnet.embedder.embedder.normalization
    assert not torch.allclose(bn.running_mean, members[0].resnet.embedder.embedder.normalization.running_mean)


def _target_eval_fn(target: torch.Tensor):
    """Held-out 'score': minus the distance of the classifier weights to a target (higher is better)."""
    return lambda model: -torch.linalg.norm(model.classifier.weight.detach() - target).item()


def test_greedy_soup_by_hand():
    members = [tiny_vit(s) for s in range(3)]
    w = [m.classifier.weight.detach() for m in members]
    target = (w[1] + w[2]) / 2  # the soup of members 1 and 2 hits the target exactly
    eval_fn = _target_eval_fn(target)
    scores = [eval_fn(m) for m in members]
    first = max(range(3), key=lambda i: scores[i])
    assert first in (1, 2)  # equidistant by construction; 0 is farther
    soup, chosen = greedy_soup(members, eval_fn)
    assert chosen == [first, 3 - first]  # member 0 would move the soup away from the target
    torch.testing.assert_close(soup.classifier.weight, target)


def test_greedy_soup_needs_strict_improvement():
    a = tiny_vit(0)
    members = [a, tiny_vit(0)]  # identical: adding the copy does not strictly improve
    _, chosen = greedy_soup(members, _target_eval_fn(torch.zeros_like(a.classifier.weight)))
    assert chosen == [0]


def test_greedy_soup_refuses_empty_held_out_set():
    members = [tiny_vit(0), tiny_vit(1)]
    with pytest.raises(ValueError, match="empty held-out"):
        make_accuracy_eval_fn(
            DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0)), batch_size=2)
        )
    with pytest.raises(ValueError, match="non-empty"):
        greedy_soup(members, make_accuracy_eval_fn(iter([])))
    with pytest.raises(ValueError, match="finite"):
        greedy_soup(members, lambda m: float("nan"))


def test_accuracy_eval_fn_matches_manual_count():
    model = tiny_vit(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with torch.no_grad():
        expected = (model(pixel_values=x).logits.argmax(-1) == y).float().mean().item()
    assert make_accuracy_eval_fn(loader)(model) == pytest.approx(expected)
    dict_batches = [{"pixel_values": x, "labels": y}]
    assert make_accuracy_eval_fn(dict_batches)(model) == pytest.approx(expected)
