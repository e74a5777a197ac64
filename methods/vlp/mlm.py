"""The tiny preset's stand-in for Bio_ClinicalBERT: a tiny BERT pretrained as a masked language model
on the pretraining corpus's reports.

Every vision-language method's paper preset starts its text tower from a BERT already trained on
clinical text. The tiny preset cannot download one, and a text tower trained from scratch by the
contrastive loss alone barely leaves chance on a CPU budget (measured: ConVIRT's validation loss
went from 4.08 to 3.98 in three epochs, chance being 4.16), so every image-text method would be
judged on how fast its text tower learns English rather than on its objective. The tiny preset
therefore makes its own clinical BERT, BERT's way: masked-language-model training (15% of tokens
chosen, of which 80% become ``[MASK]``, 10% a random token, 10% stay; transformers'
``DataCollatorForLanguageModeling``) on the captions of the MIMIC-CXR train split, the same split
the methods then pretrain on (no test or validation report is seen). The weights are cached per
(captions, vocabulary, tower shape, recipe) and shared by all methods, as a local BERT directory
is at the paper preset; the key goes into every method's weights key through :class:`TextSpec`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.paths import cache_dir
from bench.pretrain import PretrainConfig, folder_lock, generator, pretrain

log = logging.getLogger(__name__)

WEIGHTS_FILE = "bert.safetensors"
META_FILE = "meta.json"


@dataclass(frozen=True)
class MLMRecipe:
    """How the tiny text tower is pretrained (recorded in :class:`~methods.vlp.text.TextSpec`)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    mask_probability: float = 0.15
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mlm_key(captions: Sequence[str], tokenizer: Any, spec: Any, recipe: MLMRecipe) -> dict[str, Any]:
    """Everything the pretrained text weights depend on."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return {"captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
            "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
            "tower": {k: v for k, v in spec.to_dict().items() if k not in ("init", "mlm")},
            "recipe": recipe.to_dict()}


def mlm_dir(key: dict[str, Any]) -> Path:
    return cache_dir() / "pretrained" / "text-mlm" / _digest(key)


def pretrained_text_state(captions: Sequence[str], tokenizer: Any, spec: Any, recipe: MLMRecipe, *,
                          device: torch.device) -> dict[str, torch.Tensor]:
    """The ``BertModel`` state dict of the tiny tower after MLM pretraining on ``captions`` (trained once,
    then read from the cache; training resumes after an interruption)."""
    from safetensors.torch import load_file, save_file
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

    from methods.vlp import text as T

    key = mlm_key(captions, tokenizer, spec, recipe)
    final = mlm_dir(key)
    with folder_lock(final):
        if (final / WEIGHTS_FILE).is_file():
            return load_file(str(final / WEIGHTS_FILE))
        bert = T.build_bert(spec, vocab_size=T.tokenizer_vocab_size(tokenizer), seed=recipe.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = BertForMaskedLM(bert.config)
        model.bert = bert                     # the tower's own initialisation; the MLM head is discarded after
        model.tie_weights()
        tokens = T.tokenize(tokenizer, list(captions), spec.max_length)
        special = torch.isin(tokens.input_ids, torch.tensor(tokenizer.all_special_ids))
        cfg = PretrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                             weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps,
                             grad_clip=1.0, seed=recipe.seed)
        steps = max(len(captions) // recipe.batch_size, 1)

        def batches(epoch: int):
            perm = torch.randperm(len(captions), generator=generator(recipe.seed, f"mlm-shuffle:{epoch}"))
            # a collator per epoch, seeded from (seed, epoch): the masks of epoch e do not depend on
            # earlier epochs, so a resumed run draws the same masks as an uninterrupted one
            mask_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator(recipe.seed, f"mlm-mask:{epoch}")))
            collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=recipe.mask_probability,
                                                       seed=mask_seed)
            for s in range(steps):
                idx = perm[s * recipe.batch_size:(s + 1) * recipe.batch_size]
                length = int(tokens.attention_mask[idx].sum(1).max())      # no compute on all-padding columns
                ids, labels = collator.torch_mask_tokens(tokens.input_ids[idx, :length].clone(),
                                                         special[idx, :length])
                yield ids.to(device), tokens.attention_mask[idx, :length].to(device), labels.to(device)

        def objective(batch):
            ids, attention, labels = batch
            hidden = model.bert(input_ids=ids, attention_mask=attention).last_hidden_state
            masked = labels != -100
            # the vocabulary projection only where a token is predicted (15% of positions): BERT's loss,
            # a sixth of the head's cost
            logits = model.cls(hidden[masked])
            return {"mlm": torch.nn.functional.cross_entropy(logits.float(), labels[masked])}

        work = final.with_name(final.name + ".work")
        log.info("tiny text tower: masked-language-model pretraining on %d captions, %d epochs -> %s",
                 len(captions), recipe.epochs, final)
        # dropout draws from the global generator: seed it here (and leave the caller's stream alone), so the
        # cached weights are a function of the key, whoever asks first
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            outcome = pretrain(model, [{"params": list(model.parameters())}], objective, batches, steps, cfg,
                               work_dir=work, device=device, desc="text tower MLM pretraining", tensorboard=False,
                               local=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.bert.state_dict().items()}
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps({"key": key, "history": outcome.history, "captions": len(captions)},
                                                indent=1, sort_keys=True, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(work, ignore_errors=True)
        return state
