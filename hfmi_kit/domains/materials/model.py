"""Composition models: the shared set tokenizer and encoder with a masked-element head and a
band-gap head, and a deep ensemble of them for uncertainty."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hfmi_kit.domains.materials.chem import MAX_Z
from hfmi_kit.models import Backbone, EncoderConfig, PooledHead, SequenceHead, SetTokenizer, register_model
from hfmi_kit.models.tokenizers import TokenBatch

IGNORE = -100  # masked-element target of tokens that were not masked


class MaterialsNet(nn.Module):
    """Set tokenizer -> encoder; heads: masked-element logits (per token) and the property (pooled).

    Element ids are 0..``num_elements - 1``; id ``num_elements`` is the [MASK] token, whose amount
    is still shown (the model must say *which* element sits at that fraction).

    A batch holds ``elements`` (B, S) long, ``fractions`` (B, S), ``padding`` (B, S) bool and
    ``mlm_elements`` + ``mlm_target`` (B, S; :data:`IGNORE` where not masked) for masked-element
    prediction and/or ``target`` (B,) in the property's unit (eV) for regression. The property
    head predicts a Laplace distribution (location and scale ``b``): its negative log-likelihood
    ``|y - mu| / b + log b`` makes ``mu`` a median, as the field's metric (MAE) wants, and ``b``
    the model's own (aleatoric) uncertainty.
    """

    def __init__(self, *, size: EncoderConfig, num_elements: int = MAX_Z, amount_features: int = 32) -> None:
        super().__init__()
        self.num_elements = num_elements
        tok = SetTokenizer(num_elements=num_elements + 1, dim=size.dim, amount_features=amount_features)
        self.backbone = Backbone(tok, size)
        self.mlm_head = SequenceHead(dim=size.dim, out_dim=num_elements)
        self.gap_head = PooledHead(dim=size.dim, out_dim=2, hidden=size.dim)  # (mu, raw scale)

    def encode(self, elements: torch.Tensor, fractions: torch.Tensor,
               padding: torch.Tensor) -> tuple[torch.Tensor, TokenBatch]:
        tb = self.backbone.tokenizer(elements, fractions, padding)
        return self.backbone.encode(tb), tb  # (B, S, D)

    def embed(self, elements: torch.Tensor, fractions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Pooled composition embedding (B, D): the features a downstream model can reuse."""
        z, _ = self.encode(elements, fractions, padding)
        w = (~padding).to(z.dtype)[..., None]
        return (z * w).sum(1) / w.sum(1).clamp_min(1.0)

    def predict(self, elements: torch.Tensor, fractions: torch.Tensor,
                padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Property location (B,), clipped at 0 (a band gap is never negative), and Laplace scale (B,)."""
        z, tb = self.encode(elements, fractions, padding)
        mu, b = self._dist(self.gap_head(z, tb))
        return mu.clamp_min(0.0), b

    @staticmethod
    def _dist(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = out.float()
        return out[:, 0], F.softplus(out[:, 1]) + 1e-3

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss of the batch (``inputs`` = elements, fractions, padding): Laplace NLL on
        ``target`` and/or cross-entropy on ``mlm_target`` (tokens of ``mlm_elements``, or of
        ``elements`` when absent); both are summed."""
        out: dict[str, torch.Tensor] = {}
        x = batch["inputs"]  # elements, fractions, padding
        loss = torch.zeros((), device=x["fractions"].device)
        if "target" in batch:
            z, tb = self.encode(x["elements"], x["fractions"], x["padding"])
            mu, b = self._dist(self.gap_head(z, tb))
            err = (mu - batch["target"].float()).abs()
            loss = loss + (err / b + b.log()).mean()
            out["l1"] = err.mean().detach()
        if "mlm_target" in batch:
            z, tb = self.encode(batch.get("mlm_elements", x["elements"]), x["fractions"], x["padding"])
            logits = self.mlm_head(z, tb)  # (B, S, E)
            tgt = batch["mlm_target"]
            loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                          ignore_index=IGNORE)
            with torch.no_grad():
                hit = (logits.argmax(-1) == tgt) & (tgt != IGNORE)
                out["mlm_accuracy"] = hit.sum() / (tgt != IGNORE).sum().clamp_min(1)
        out["loss"] = loss
        return out


class MaterialsEnsemble(nn.Module):
    """``members`` independently trained :class:`MaterialsNet`; mean and spread of their predictions."""

    def __init__(self, *, size: EncoderConfig, members: int = 3, **kw: Any) -> None:
        super().__init__()
        self.members = nn.ModuleList(MaterialsNet(size=size, **kw) for _ in range(members))

    @torch.no_grad()
    def predict_all(self, elements: torch.Tensor, fractions: torch.Tensor,
                    padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, B) locations and (K, B) Laplace scales of every member."""
        outs = [m.predict(elements, fractions, padding) for m in self.members]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    @torch.no_grad()
    def embed(self, elements: torch.Tensor, fractions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Member-averaged pooled embedding (B, D)."""
        return torch.stack([m.embed(elements, fractions, padding) for m in self.members]).mean(0)


# the model families, created by name: create_model("<family>.<size>", **kwargs)
register_model("materials_net")(MaterialsNet)
register_model("materials_ensemble")(MaterialsEnsemble)
