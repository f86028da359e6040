"""Fine-tune an open_clip model on a noisy image-caption dataset (the training side of L2RM).

:func:`finetune` (also ``pmpclean.finetune``) is the only training loop in pmpclean.
It reads a manifest (or the output folder of ``pmpclean scan``), holds out a
validation split, and trains the open_clip model with a loss that respects what the
audit learned. One idea per module, as ``open_clip_train`` lays them out:

``data``
    The usable rows of a manifest or scan folder, the validation hold-out, the
    decoded images.
``model``
    Loading the model, optimizer, learning-rate schedule, autocast, batched encoding.
``loss``
    The per-batch loss (:func:`pmpclean.train.loss._batch_loss`).
``targets``
    The clean/suspect split of each refresh and the suspects' rematched partners.
``loop``
    :class:`TrainState` and the epoch loop of three calls: ``train_one_epoch``,
    ``validate``, ``save``.
``checkpoint``
    The run's files, and ``resume.pt`` (including the layout of older versions).
``main``
    :func:`finetune` and :func:`evaluate_retrieval`.

The method
----------
* **Clean pairs** get the symmetric contrastive loss over the batch: InfoNCE, or, when
  a model trained from random initialisation audits itself, its noise-robust form
  RINCE (``robust_q``: each direction's loss is ``(1 - p^q) / q`` for the softmax
  probability ``p`` of the true partner, so a pair the model cannot fit, usually a
  mismatched one, pulls with weight ``p^q``; Chuang et al., "Robust Contrastive
  Learning against Noisy Views", CVPR 2022). Other rows of the same image, and rows
  with the identical caption text, are not used as negatives: they are not wrong
  answers.
* **Suspect pairs** (pairs the split flags as probably mismatched) do not get their
  given caption as a target. With ``suspect_targets="global"`` (the default with a
  scan folder or pretrained weights), at every split refresh
  :func:`pmpclean.rematching.rematch` solves one *partial* optimal-transport problem
  between all suspect images and all suspect captions of the dataset, with the cost
  learned from the clean pairs and the original pairing (and the image's other
  captions, and identical caption text) forbidden; from a scan folder the first split
  uses the scan's own proposals. A suspect whose proposal reaches
  ``rematch_min_confidence`` trains as the pair (its image, the proposed caption) with
  the clean loss weighted by the confidence; the others only serve as negatives. Each
  refresh also checks that the current model can rematch at all: clean rows of images
  with no suspect row (a quarter of the clean rows, at most 256), their captions
  deranged among themselves, are planted among the suspects; unless the 90 % lower
  confidence bound of the share of planted proposals that give the image its own
  caption back reaches ``rematch_min_confidence``, no proposal is trained on until the
  next refresh (``metrics.json``: ``planted_check``). With fewer than 8 such rows the
  proposals are used unchecked. ``suspect_targets="batch"`` (the default when a model
  trained from random initialisation audits itself) keeps the research code's scheme:
  per batch, an entropic partial plan between the batch's suspect images and captions
  (mass ``ot_mass``, cost ``1 - s`` of the detached embeddings); a suspect whose
  transported mass reaches ``min_plan_mass`` of its marginal and whose target looks
  like a true pair (its plan-weighted similarity reaches the ``target_quantile``
  quantile of the batch's clean-pair similarities) gets the normalised plan row (and
  column) as a soft target, matched to the model's in-batch distribution with a
  symmetric KL divergence (Han et al., "Learning to Rematch Mismatched Pairs for Robust
  Cross-Modal Retrieval", CVPR 2024). Measured comparisons of the two schemes are in
  ``benchmarks/results/finetune*.md``.
* **The split** comes from the audit when the dataset is a ``pmpclean scan`` output
  (its ``is_mismatched`` column), otherwise from a two-component Gaussian mixture on
  the per-pair contrastive loss of the current model, after ``split_warmup_epochs``
  of plain training (from random initialisation: until the model beats chance on its
  training batches). It is refreshed every ``split_every`` epochs as the model improves.
  With an audit, every refreshed split averages the scan's ``match_score`` (weight
  ``audit_weight``) with the mixture's clean probability: a model that is still
  learning must not overrule the audit of a stronger model on its own.

``method="contrastive"`` skips the split and trains every pair with plain InfoNCE
(the baseline; also what you want on an already-cleaned manifest).

Output folder (``out_dir``)
---------------------------
``open_clip_pytorch_model.bin``
    The weights (a plain ``state_dict``), loadable with
    ``open_clip.create_model_and_transforms(MODEL, pretrained=PATH)`` when ``MODEL``
    is a registered architecture, and by ``pmpclean scan --model MODEL --pretrained PATH``.
    With validation it holds the best epoch by validation recall, else the last one.
``open_clip_config.json``
    ``{"model_cfg": ..., "preprocess_cfg": ...}``: with it the folder itself is a model,
    ``open_clip.create_model_and_transforms("local-dir:" + out_dir)``.
``model_config.json``
    The architecture alone (an open_clip model config: ``embed_dim``, ``vision_cfg``,
    ``text_cfg``), registrable with ``open_clip.add_model_config``.
``metrics.json``
    Image-to-text and text-to-image R@1/5/10 on the held-out split before and after
    training, the per-epoch history (losses, split size, validation recall, split
    quality when ground truth was given), settings, versions and timings.
``finetune_config.yaml``
    The resolved settings of the run.
``resume.pt``
    Everything needed to continue an interrupted run (weights, optimizer, scheduler,
    step, epoch, split, RNG state); removed at the end unless ``keep_resume=True``.
"""

from __future__ import annotations

from ..config import METHODS, PRECISIONS, SCHEDULES, FinetuneConfig
from ..transport import partial_ot_plan
from .checkpoint import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    MODEL_CONFIG_NAME,
    OPEN_CLIP_CONFIG_NAME,
    RESUME_NAME,
    SETTINGS_NAME,
)
from .main import FinetuneResult, evaluate_retrieval, finetune
from .metrics import retrieval_recall

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "evaluate_retrieval",
    "retrieval_recall",
    "partial_ot_plan",
    "METHODS",
    "SCHEDULES",
    "PRECISIONS",
    "CHECKPOINT_NAME",
    "OPEN_CLIP_CONFIG_NAME",
    "MODEL_CONFIG_NAME",
    "METRICS_NAME",
    "SETTINGS_NAME",
    "RESUME_NAME",
]
