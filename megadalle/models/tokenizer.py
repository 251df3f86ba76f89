"""Lower-cased BPE (sentencepiece) with BPE-dropout in training mode (Sec. 2.2).

Ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>, then the BPE pieces. Captions are encoded without <s>/</s>:
the prior's stream gives each text position a learned padding token where there is no text.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import sentencepiece as spm
import torch

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass
class EncodeStats:
    encoded: int = 0
    """Captions encoded."""
    truncated: int = 0
    """Captions longer than max_len, cut to max_len."""
    dropped_tokens: int = 0
    """Tokens cut by truncation, summed."""


class BPETokenizer:
    """Wraps a sentencepiece BPE model. `train()` turns BPE-dropout on, `eval()` off (deterministic)."""

    def __init__(self, model_path: str | os.PathLike, max_len: int = 256, dropout: float = 0.1, lowercase: bool = True):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path} (train it with tools/train_tokenizer.py)")
        if not 0 <= dropout < 1:
            raise ValueError(f"BPE-dropout must be in [0, 1), got {dropout}")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.max_len = max_len
        self.dropout = dropout
        self.lowercase = lowercase
        self.training = False
        self.stats = EncodeStats()
        self.rng = random.Random(0)
        self._piece_ids: dict[str, int] = {}  # piece -> id, for the pieces BPE-dropout looks up

    def seed(self, seed: int) -> None:
        """Seed BPE-dropout: a run, and a run resumed by replaying its data, draws the same tokenisations
        (sentencepiece's own sampling cannot be seeded: `set_random_generator_seed` does not reach it)."""
        self.rng = random.Random(seed)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def train(self, mode: bool = True) -> BPETokenizer:
        self.training = mode
        return self

    def eval(self) -> BPETokenizer:
        return self.train(False)

    def normalize(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"caption must be a str, got {type(text).__name__}")
        text = " ".join(text.split())
        return text.lower() if self.lowercase else text

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, at most `max_len` (longer ones are truncated and counted)."""
        norm = self.normalize(text)
        if not norm:
            raise ValueError(f"empty caption {text!r}: every sample needs text")
        if self.training and self.dropout > 0:
            ids = self._encode_dropout(norm)
        else:
            ids = self.sp.encode(norm, out_type=int)
        self.stats.encoded += 1
        if len(ids) > self.max_len:
            self.stats.truncated += 1
            self.stats.dropped_tokens += len(ids) - self.max_len
            ids = ids[: self.max_len]
        return ids

    def _piece_id(self, piece: str) -> int | None:
        """The id of `piece`, or None when it is not in the vocabulary."""
        pid = self._piece_ids.get(piece)
        if pid is None:
            pid = self.sp.piece_to_id(piece)
            pid = -1 if pid == self.sp.unk_id() and piece != self.sp.id_to_piece(pid) else pid
            self._piece_ids[piece] = pid
        return None if pid < 0 else pid

    def _encode_dropout(self, norm: str) -> list[int]:
        """BPE with dropout (Provilkov et al. 2020): at every merge step each candidate merge is dropped with
        probability `dropout`, then the best-scoring remaining one (the leftmost on ties) is made; with dropout 0
        this is sentencepiece's BPE, id for id (tested). Words are merged separately (pieces never span a space)."""
        ids: list[int] = []
        for word in self.sp.normalize(norm).replace("\u2581", " \u2581").split(" "):
            symbols = list(word)
            while len(symbols) > 1:
                best, best_score = -1, 0.0
                for i in range(len(symbols) - 1):
                    pid = self._piece_id(symbols[i] + symbols[i + 1])
                    if pid is None or self.rng.random() < self.dropout:
                        continue
                    score = self.sp.get_score(pid)
                    if best < 0 or score > best_score:
                        best, best_score = i, score
                if best < 0:
                    break
                symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
            ids += [self.sp.piece_to_id(sym) for sym in symbols]  # an unknown character: the unk id
        return ids

    def encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, lengths): ids (B, max_len) int64 padded with PAD_ID, lengths (B,)."""
        out = torch.full((len(texts), self.max_len), PAD_ID, dtype=torch.long)
        lengths = torch.zeros(len(texts), dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths[i] = len(ids)
        return out, lengths

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)])


def train_bpe(
    sentences: list[str], model_prefix: str | os.PathLike, vocab_size: int, lowercase: bool = True, seed: int = 0
) -> str:
    """Train a BPE model on `sentences`; returns the .model path. ValueError when the corpus is too small."""
    sentences = [" ".join(s.split()) for s in sentences]
    sentences = [s.lower() if lowercase else s for s in sentences if s]
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=str(model_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            split_digits=True,
            byte_fallback=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece could not train a {vocab_size}-token BPE on {len(sentences)} sentences: {e}. "
            "Lower tokenizer.vocab_size or add text with tokenizer.extra_text."
        ) from None
    return f"{model_prefix}.model"
