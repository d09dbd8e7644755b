"""A tiny byte-level BPE tokenizer built in memory (no downloads), LLaMA-like: BOS on encode, EOS known.

Ids: 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, then the 256 byte symbols, then one id per merge. Any text
encodes, and with no merges every byte is one token, which keeps hand-computed values easy.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# A few merges so token counts differ from character counts (acc vs acc_norm must differ).
DEFAULT_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"))


def tiny_tokenizer(merges=DEFAULT_MERGES, add_bos: bool = True) -> PreTrainedTokenizerFast:
    # alphabet() is unordered: sort the byte symbols so ids are the same in every run.
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")

