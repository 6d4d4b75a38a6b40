"""The online probes' loss: labelled samples only, no data-dependent branch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amdim.probes import LOGIT_CLIP, LOGIT_REG, classifier_loss


def _reference(logits, labels):
    clipped = LOGIT_CLIP * torch.tanh(logits / LOGIT_CLIP)
    penalty = LOGIT_REG * (logits**2).mean()
    if (labels >= 0).any():
        return F.cross_entropy(clipped, labels, ignore_index=-1) + penalty
    return penalty


def test_matches_cross_entropy_over_the_labelled_samples():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g) * 30
    for labels in (
        torch.randint(0, 10, (16,), generator=g),  # all labelled
        torch.where(torch.arange(16) % 3 == 0, -1, torch.randint(0, 10, (16,), generator=g)),  # some not
        torch.full((16,), -1),  # none: the penalty alone
    ):
        torch.testing.assert_close(classifier_loss(logits, labels), _reference(logits, labels))


def test_unlabelled_samples_get_no_cross_entropy_gradient():
    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.tensor([3, -1, -1, 7])
    classifier_loss(logits, labels).backward()
    penalty_only = 2 * LOGIT_REG * logits.detach() / logits.numel()
    torch.testing.assert_close(logits.grad[1:3], penalty_only[1:3])
    assert not torch.allclose(logits.grad[0], penalty_only[0])


def test_traces_without_a_graph_break():
    explained = torch._dynamo.explain(classifier_loss)(torch.randn(8, 10), torch.tensor([1, -1] * 4))
    assert explained.graph_break_count == 0
