"""The AMDIM model: encoder, optional mixture head, multiscale NCE and the online probes, wired.

One ``forward(x1, x2, labels)`` is one training step's computation, so that a DDP wrapper sees a
single forward per step while each view still gets its own encoder call (spec 2.4: BN statistics
are per view, never mixed across the two views).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from amdim.config import LossConfig, ModelConfig
from amdim.encoder import Encoder
from amdim.mixture import MixtureHead
from amdim.nce import multiscale_nce
from amdim.probes import OnlineProbes, classifier_loss, correct_and_count


class AMDIM(nn.Module):
    """Encoder + mixture head + online probes.

    Args:
        model_cfg: encoder and probe sizes.
        loss_cfg: NCE pairs, regulariser, clip and mixture settings.
        n_classes: label count of the dataset (online probes).
    """

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, n_classes: int):
        super().__init__()
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.encoder = Encoder(model_cfg)
        self.mixture = (
            MixtureHead(model_cfg.n_rkhs, loss_cfg.n_mix, loss_cfg.mix_hidden) if loss_cfg.n_mix > 1 else None
        )
        self.probes = OnlineProbes(model_cfg.n_rkhs, n_classes, model_cfg.mlp_hidden, model_cfg.mlp_dropout)
        # The NCE score matmul's inputs, "fp32" or "bf16" (train.matmul_precision; amdim.speed.prepare).
        self.score_precision = "fp32"
        # What the configured loss never reaches gets no gradient: frozen, so that DDP (which
        # waits for a gradient of every parameter that requires one) and the optimiser skip it.
        # The modules stay, so checkpoints keep one layout whatever the loss.
        for module in self.unused_by_loss():
            module.requires_grad_(False)

    def unused_by_loss(self) -> list[nn.Module]:
        """The modules no term of ``loss_cfg`` reaches (spec 3.2): the embedding head of a map no
        pair uses; without a pair whose antecedent is the global feature, the mixture head and
        the trunk above the highest local tap in use (the online probes read that feature
        detached); with mixtures on, the mixture head when no configured pair uses them."""
        pairs = self.loss_cfg.pairs
        sizes = {int(pair[i]) for pair in pairs for i in (0, 2)}
        unused: list[nn.Module] = []
        enc = self.encoder
        if 5 not in sizes:
            unused.append(enc.rkhs_5)
        if 7 not in sizes:
            unused.append(enc.rkhs_7)
        global_src = any(pair[0] == "1" for pair in pairs)
        if self.mixture is not None and not (global_src and set(pairs) & set(self.loss_cfg.mix_pairs)):
            unused.append(self.mixture)
        if not global_src:
            top = max(enc.tap_5 if 5 in sizes else -1, enc.tap_7 if 7 in sizes else -1)
            unused.extend(enc.layers[top + 1 :])
        return unused

    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        labels: Tensor,
        *,
        gather: Callable[[Tensor], Tensor] | None = None,
        rank_offset: int = 0,
    ) -> dict[str, Tensor]:
        """Losses and online-probe statistics of one batch.

        Args:
            x1, x2: (B, 3, S, S) the two augmented views.
            labels: (B,) int64, -1 for unlabelled images.
            gather: differentiable all-gather for global negatives (identity when None).
            rank_offset: this process's first global index, ``rank * B``.

        Returns:
            ``loss`` (NCE + regulariser + probe losses, what the optimiser minimises),
            ``loss_nce`` (NCE + regulariser), every NCE term, ``reg``, ``loss_cls`` and the
            online training accuracies' counts ``correct_lin``, ``correct_mlp``, ``labelled``.
        """
        a = self.encoder(x1)  # separate calls: BN statistics per view (spec 2.4)
        b = self.encoder(x2)
        mix_a = mix_b = None
        if self.mixture is not None:
            mix_a = self.mixture(a[0].flatten(1))
            mix_b = self.mixture(b[0].flatten(1))
        out = multiscale_nce(
            a, b, self.loss_cfg, gather=gather, rank_offset=rank_offset, mix_a=mix_a, mix_b=mix_b,
            precision=self.score_precision,
        )  # fmt: skip

        # Online probes on the detached global features of both views (spec 6.1).
        feats = torch.cat([a[0], b[0]]).flatten(1).detach()
        y2 = torch.cat([labels, labels])
        lin, mlp = self.probes(feats)
        loss_cls = classifier_loss(lin, y2) + classifier_loss(mlp, y2)
        lin_ok, n = correct_and_count(lin, y2)
        mlp_ok, _ = correct_and_count(mlp, y2)

        out["loss_nce"] = out["loss"]
        out["loss_cls"] = loss_cls
        out["loss"] = out["loss"] + loss_cls
        out["correct_lin"] = lin_ok
        out["correct_mlp"] = mlp_ok
        out["labelled"] = n
        return out
