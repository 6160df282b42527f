"""uniform_soup / greedy_soup / recompute_batchnorm on tiny real models, against hand-computed values."""

import warnings
import weakref

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertForMaskedLM, ViTForImageClassification

from hf_ens import greedy_soup, make_accuracy_eval_fn, recompute_batchnorm, uniform_soup
from hf_ens.testing_utils import random_images, tiny_bert_config, tiny_resnet, tiny_vit


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


# ------------------------------------------------------------------ streaming soups and weighted_average


def _save_members(tmp_path, n: int, dtype=None) -> list:
    paths = []
    for k in range(n):
        model = tiny_vit(k) if dtype is None else tiny_vit(k).to(dtype)
        model.save_pretrained(tmp_path / f"member_{k:02d}")
        paths.append(tmp_path / f"member_{k:02d}")
    return paths


@pytest.fixture
def live_members(monkeypatch):
    """Counts the members loaded from disk that are alive at once (the real strict loader runs)."""
    import hf_ens.soups

    real, live, peak = hf_ens.soups.load_member, set(), [0]

    def counting_load(path, *args, **kwargs):
        model = real(path, *args, **kwargs)
        token = object()
        live.add(id(token))
        weakref.finalize(model, live.discard, id(token))
        model._liveness_token = token
        peak[0] = max(peak[0], len(live))
        return model

    monkeypatch.setattr(hf_ens.soups, "load_member", counting_load)
    return peak


def test_uniform_soup_of_directories_streams_one_member_at_a_time(tmp_path, live_members):
    paths = _save_members(tmp_path, 5)
    soup = uniform_soup(paths)
    assert live_members[0] <= 2  # the running mean (which becomes the soup) and the member being added
    states = [tiny_vit(k).state_dict() for k in range(5)]
    for name, value in soup.state_dict().items():
        torch.testing.assert_close(value, sum(s[name] for s in states) / 5)


def test_greedy_soup_of_directories_streams_and_reuses_one_working_model(tmp_path, live_members):
    paths = _save_members(tmp_path, 4)
    w = [tiny_vit(k).classifier.weight.detach() for k in range(4)]
    target = (w[1] + w[2] + w[3]) / 3
    tried = []

    def eval_fn(model):
        tried.append(weakref.ref(model))  # not keeping the model alive
        return _target_eval_fn(target)(model)

    soup, chosen = greedy_soup(paths, eval_fn)
    assert live_members[0] <= 2  # the working soup and the member being tried
    candidates = tried[4:]  # after scoring the 4 members: one try per remaining member
    assert len(candidates) == 3 and all(c() is soup for c in candidates)  # no new soup per try
    assert sorted(chosen) == [1, 2, 3]
    # bit-identical to averaging the chosen members in the order they were added
    expected = uniform_soup([tiny_vit(k) for k in chosen]).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in soup.state_dict().items())


def test_greedy_soup_recomputes_bn_for_every_candidate_and_the_result():
    members = [tiny_resnet(s) for s in range(3)]
    bn_means = []

    def eval_fn(model):  # prefers soups whose first BN mean (recomputed on the loader) is small
        value = model.resnet.embedder.embedder.normalization.running_mean.sum().item()
        bn_means.append(value)
        return -value

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soup, chosen = greedy_soup(members, eval_fn, bn_dataloader=_resnet_loader())
    expected = uniform_soup([members[j] for j in chosen], bn_dataloader=_resnet_loader())
    for name, value in soup.state_dict().items():
        torch.testing.assert_close(value, expected.state_dict()[name], msg=name)
    with pytest.warns(UserWarning, match="BatchNorm"):
        greedy_soup(members, eval_fn)  # no loader: the same warning as uniform_soup


def test_weighted_average_weights_into_and_mixed_sources(tmp_path):
    from hf_ens.soups import weighted_average

    a, b = tiny_vit(0), tiny_vit(1)
    path_b = _save_members(tmp_path, 2)[1]
    avg = weighted_average([a, path_b], [3.0, 1.0])  # a module and a directory
    wa, wb = a.classifier.weight, b.classifier.weight
    torch.testing.assert_close(avg.classifier.weight, (3 * wa + wb) / 4)
    working = tiny_vit(7)
    assert weighted_average([a, b], [0.25, 0.75], into=working) is working
    torch.testing.assert_close(working.classifier.weight, 0.25 * wa + 0.75 * wb)
    extrapolated = weighted_average([a, b], [-1.0, 2.0])
    torch.testing.assert_close(extrapolated.classifier.weight, 2 * wb - wa)
    assert torch.equal(a.classifier.weight, tiny_vit(0).classifier.weight)  # inputs untouched
    for bad, match in (([1.0], "one finite weight"), ([1.0, float("nan")], "one finite weight"),
                       ([1.0, -1.0], "sum to 0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            weighted_average([a, b], bad)
    with pytest.raises(TypeError, match="member 1 is a dict"):
        weighted_average([a, {"w": torch.zeros(1)}])
    with pytest.raises(ValueError, match="different architectures"):
        weighted_average([a, tiny_vit(0, hidden_size=16)])


def test_bf16_member_directories_are_accumulated_in_fp32(tmp_path):
    paths = _save_members(tmp_path, 3, dtype=torch.bfloat16)
    soup = uniform_soup(paths)
    from hf_ens.members import load_member

    w = [load_member(p).classifier.weight for p in paths]
    assert soup.classifier.weight.dtype == torch.bfloat16
    assert torch.equal(
        soup.classifier.weight, ((w[0].float() + w[1].float() + w[2].float()) / 3).to(torch.bfloat16)
    )
