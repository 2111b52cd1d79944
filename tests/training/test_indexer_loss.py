"""The indexer's distillation loss: equal to KL written out in numpy, reaching the indexer's parameters only, and
teaching a random indexer to pick what dense attention reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.trace.dense_topk import v4_attention_probs
from workbench.training.indexer_loss import IndexerTap, index_scores, indexer_kl, indexer_loss
from workbench.training.indexer_quality import indexer_recall_table


@pytest.fixture
def model():
    return wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny-v4"), seed=5).train()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(6))


def test_kl_equals_numpy_and_the_scores_equal_the_indexers(model, ids):
    tap = IndexerTap(model)
    seen = {}
    with model.probes.listen(["blocks.1.attn.hook_index_scores"], lambda _n, v: seen.__setitem__("s", v.detach())):
        model(ids)
    tap.remove()
    assert sorted(tap.attns) == [1, 3]  # the CSA layers
    attn, (x, positions) = tap.attns[1], tap.inputs[1]
    with torch.no_grad():
        q_latent = attn.q_a_norm(attn.q_a_proj(x))
        scores = index_scores(attn, x, q_latent, positions)
    torch.testing.assert_close(scores, seen["s"], rtol=0, atol=0)  # the very scores the indexer ranks
    with torch.no_grad():
        p = v4_attention_probs(attn, x, positions)[1].sum(2).double().numpy()  # [B, S, N]
    s = scores.double().numpy()
    kls = []
    for b in range(p.shape[0]):
        for t in range(p.shape[1]):
            ok = np.isfinite(s[b, t])
            if not ok.any():
                continue
            target = p[b, t, ok] / p[b, t, ok].sum()
            logq = s[b, t, ok] - np.log(np.exp(s[b, t, ok] - s[b, t, ok].max()).sum()) - s[b, t, ok].max()
            kls.append(float((target * (np.log(target) - logq)).sum()))
    assert len(kls) == 2 * (96 - 3)  # queries 3.. have a complete entry (ratio 4)
    assert float(indexer_kl(attn, x, positions)) == pytest.approx(np.mean(kls), rel=1e-5)


def test_gradient_reaches_the_indexer_only(model, ids):
    tap = IndexerTap(model)
    model(ids)
    indexer_loss(tap).backward()
    tap.remove()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".indexer." in n for n in with_grad), sorted(with_grad)[:5]
    assert {n.split(".")[1] for n in with_grad} == {"1", "3"}


def test_a_model_without_indexer_has_no_loss():
    model = wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny"), seed=0)
    tap = IndexerTap(model)
    model(torch.zeros(1, 8, dtype=torch.long))
    assert indexer_loss(tap) is None


def test_distillation_raises_recall_above_chance(model, ids):
    before = indexer_recall_table(model.eval(), ids)
    model.train()
    tap = IndexerTap(model)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if ".indexer." in n], lr=1e-2)
    first = None
    for _ in range(30):
        model(ids)
        loss = indexer_loss(tap)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    tap.remove()
    after = indexer_recall_table(model.eval(), ids)
    assert float(loss) < 0.5 * first
    for b, a in zip(before, after, strict=True):
        assert a["recall"] > max(b["recall"], a["chance"]) + 0.1, (b, a)
