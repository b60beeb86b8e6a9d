"""Preference optimisation losses (``train.stage: dpo``): DPO and its variants, on sequence log-probs.

Every loss compares a pair of responses to one prompt, ``chosen`` (c) and ``rejected`` (r), through
the policy's log-probability of each response ``pi_c``, ``pi_r`` (the sum over its tokens, EOS
included) and, for the losses that have one, the reference model's ``ref_c``, ``ref_r``: the base
model with the adapters off (TRL's and LLaMA-Factory's reference for a LoRA policy). ``beta`` is
``train.pref_beta``; ``sigma`` the logistic function. Per pair (LLaMA-Factory's ``pref_loss`` names
and definitions):

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``h = (pi_c - ref_c) - (pi_r - ref_r)``,
  ``loss = -log sigma(beta h)``; with label smoothing ``eps`` (``train.dpo_label_smoothing``,
  conservative DPO: the labels are flipped with probability ``eps``)
  ``loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``.
- ``hinge`` (SLiC, Zhao et al. 2023): ``loss = max(0, 1 - beta h)``.
- ``ipo`` (Azar et al. 2023): ``h`` from per-token *mean* log-probs, ``loss = (h - 1 / (2 beta))^2``.
- ``kto_pair`` (KTO on pairs, TRL's former ``kto_pair``): with ``r_c = pi_c - ref_c``, ``r_r =
  pi_r - ref_r`` and their batch means clamped at 0, without gradient, ``z_c``, ``z_r``:
  ``loss = (1 - sigma(beta (r_c - z_r)) + 1 - sigma(beta (z_c - r_r))) / 2``.
- ``orpo`` (Hong et al. 2024; no reference): with mean log-probs ``a_c``, ``a_r``,
  ``log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))``,
  ``loss = -a_c - beta log sigma(log_odds)``.
- ``simpo`` (Meng et al. 2024; no reference): ``loss = -log sigma(beta (a_c - a_r) - gamma)``,
  ``gamma = train.simpo_gamma``.

The implicit rewards logged are ``beta (pi - ref)`` (``beta a`` without a reference).
``train.pref_ftx`` adds that multiple of the chosen response's mean token NLL (``-a_c``; an SFT term)
to every loss but ``orpo``'s, which has it already.

KTO (Ethayarajh et al. 2024; ``train.stage: kto``, TRL's ``KTOTrainer`` and LLaMA-Factory's
``stage: kto``) learns from *unpaired* responses, each labelled desirable or undesirable. With
``r = pi - ref`` a response's log-ratio and ``z`` the batch's KL estimate (the mean of ``pi - ref``
over mismatched prompt-response pairs of the batch, averaged over the processes, clamped at 0,
without gradient):

- desirable: ``loss = w_d (1 - sigma(beta (r - z)))``; undesirable: ``loss = w_u (1 - sigma(beta (z - r)))``,

``w_d``, ``w_u`` being ``train.kto_desirable_weight`` and ``train.kto_undesirable_weight``; the
step's loss is the mean over the batch's examples. Rewards: ``beta r``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PREF_LOSSES", "kto_loss", "needs_reference", "preference_loss", "sequence_logps"]

PREF_LOSSES = ("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")
_MEAN_LOGPS = ("ipo", "orpo", "simpo")  # per-token means instead of sums
_REFERENCE = ("sigmoid", "hinge", "ipo", "kto_pair")


def needs_reference(kind: str) -> bool:
    """Whether ``kind`` compares with the reference model (a second, gradient-free forward)."""
    return kind in _REFERENCE


def sequence_logps(token_ce: torch.Tensor, rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of log-probs, number of tokens)`` of each of ``n_rows`` rows, from the cross-entropy of
    every response token (``token_ce``, float32) and the row of each."""
    logps = token_ce.new_zeros(n_rows).index_add(0, rows, -token_ce)
    counts = token_ce.new_zeros(n_rows).index_add(0, rows, torch.ones_like(token_ce))
    return logps, counts


def preference_loss(kind: str, beta: float, chosen: tuple[torch.Tensor, torch.Tensor],
                    rejected: tuple[torch.Tensor, torch.Tensor], ref_chosen: torch.Tensor | None = None,
                    ref_rejected: torch.Tensor | None = None, *, gamma: float = 0.5,
                    ftx: float = 0.0, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ``(loss, chosen reward, rejected reward)`` of the module docstring. ``chosen`` and
    ``rejected`` are ``(summed log-probs, token counts)`` of the policy; ``ref_*`` the reference's
    summed log-probs (needed by all but ``orpo`` and ``simpo``). Any leading shape; the last one is
    the batch (``kto_pair`` averages over it)."""
    if kind not in PREF_LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; valid: {', '.join(PREF_LOSSES)}")
    (pi_c, n_c), (pi_r, n_r) = chosen, rejected
    n_c, n_r = n_c.clamp_min(1), n_r.clamp_min(1)
    mean = kind in _MEAN_LOGPS
    if mean:
        pi_c, pi_r = pi_c / n_c, pi_r / n_r
    if needs_reference(kind):
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"preference loss {kind!r} needs the reference model's log-probs")
        ref_c, ref_r = (ref_chosen / n_c, ref_rejected / n_r) if mean else (ref_chosen, ref_rejected)
        h = (pi_c - ref_c) - (pi_r - ref_r)
        if kind == "sigmoid":
            loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        elif kind == "hinge":
            loss = torch.relu(1 - beta * h)
        elif kind == "kto_pair":  # the batch's KL estimates: the means over its last dimension
            r_c, r_r = pi_c - ref_c, pi_r - ref_r
            z_c = r_c.detach().mean(-1, keepdim=True).clamp_min(0)
            z_r = r_r.detach().mean(-1, keepdim=True).clamp_min(0)
            loss = (2 - torch.sigmoid(beta * (r_c - z_r)) - torch.sigmoid(beta * (z_c - r_r))) / 2
        else:  # ipo
            loss = (h - 1 / (2 * beta)) ** 2
        reward_c, reward_r = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    else:
        if kind == "orpo":  # log(1 - e^a) for a < 0, stably
            log_odds = (pi_c - pi_r) - (torch.log1p(-torch.exp(pi_c)) - torch.log1p(-torch.exp(pi_r)))
            loss = -pi_c - beta * F.logsigmoid(log_odds)
        else:  # simpo
            loss = -F.logsigmoid(beta * (pi_c - pi_r) - gamma)
        reward_c, reward_r = beta * pi_c.detach(), beta * pi_r.detach()
    if ftx and kind != "orpo":
        loss = loss + ftx * -(chosen[0] / n_c)
    return loss, reward_c, reward_r


def kto_loss(beta: float, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``(loss, reward)`` of KTO (the module docstring) from the policy's and the
    reference's summed log-probs of each response, its label (bool) and the KL estimate ``kl``."""
    r = logps - ref_logps
    z = kl.detach()
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    return loss, beta * r.detach()
