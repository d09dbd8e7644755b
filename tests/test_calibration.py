"""Calibration: one validated type for the rows every data-reading stage runs on, and the one held-out loss."""
import pytest
import torch

from fxprune.data.calibration import Calibration
from fxprune.data.loaders import PACKAGED_C4, calibration_samples
from fxprune.util.lm import lm_loss, mean_token_loss
from tiny_tokenizer import tiny_tokenizer


def ids(rows, seq, seed=0):
    return torch.randint(4, 100, (rows, seq), generator=torch.Generator().manual_seed(seed))


def test_a_tensor_becomes_rows_with_a_full_mask():
    x = ids(3, 5).int()
    cal = Calibration.of(x)
    assert cal.ids.dtype == torch.long and torch.equal(cal.ids, x.long())
    assert torch.equal(cal.mask, torch.ones(3, 5, dtype=torch.long))
    assert Calibration.of(cal) is cal and len(cal) == 3 and cal.target_tokens == 3 * 4


def test_ragged_items_are_right_padded_in_order_with_their_masks():
    a, b = ids(2, 4, 1), ids(1, 6, 2)
    mask_b = torch.tensor([[1, 1, 1, 1, 1, 0]])
    cal = Calibration.of([a, {"input_ids": b, "attention_mask": mask_b}])
    assert cal.ids.shape == (3, 6)
    assert torch.equal(cal.ids[:2, :4], a) and torch.equal(cal.ids[:2, 4:], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(cal.mask, torch.tensor([[1, 1, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 1, 0]]))
    assert torch.equal(Calibration.cat([Calibration.of(a), Calibration.of(b)]).ids[2], b[0])


@pytest.mark.parametrize("make,message", [
    (lambda: Calibration(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.long)),
     r"Calibration.ids must be a 2-D LongTensor \[rows, seq\], got dtype torch.float32"),
    (lambda: Calibration(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)),
     r"Calibration.ids must be a 2-D LongTensor .*shape \(4,\)"),
    (lambda: Calibration(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)),
     r"Calibration.mask must have the shape of Calibration.ids \(2, 3\), got \(2, 4\)"),
    (lambda: Calibration(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)),
     r"Calibration.ids must have shape \[rows >= 1, seq >= 2\]"),
    (lambda: Calibration(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]])),
     "Calibration.mask: row 1 has no real token"),
    (lambda: Calibration.of([ids(1, 3), torch.rand(1, 3)]), "calibration item 1: input_ids must be an integer"),
    (lambda: Calibration.of([{"ids": ids(1, 3)}]), "calibration item 0 is a dict without 'input_ids'"),
    (lambda: Calibration.of({"input_ids": ids(1, 3), "attention_mask": torch.ones(1, 2)}),
     r"calibration item 0: attention_mask must be a tensor shaped like input_ids \(1, 3\)"),
    (lambda: Calibration.of({"input_ids": ids(1, 3), "attention_mask": torch.zeros(1, 3)}),
     "calibration item 0: Calibration.mask: row 0 has no real token"),
    (lambda: Calibration.of("some text"), "calibration: expected token ids"),
    (lambda: Calibration.of([]), "calibration is empty"),
    (lambda: Calibration.of(torch.full((1, 4), 500), vocab_size=128), r"token ids must lie in \[0, 128\), got .*500"),
])
def test_bad_calibration_is_refused_naming_what_is_wrong(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_padding_is_not_checked_against_the_vocabulary():
    cal = Calibration(torch.tensor([[5, 6, -1]]), torch.tensor([[1, 1, 0]]))
    assert cal.check_vocab(10) is cal


def test_batches_cut_rows_in_order_and_drop_padding_columns_no_row_of_the_batch_uses():
    cal = Calibration.of([ids(3, 4, 1), ids(2, 7, 2)])
    got = list(cal.batches(2))
    assert [tuple(i.shape) for i, _ in got] == [(2, 4), (2, 7), (1, 7)]
    assert torch.equal(torch.cat([i[:, :4] for i, _ in got]), cal.ids[:, :4])
    assert all(torch.equal(m, cal.mask[2 * k:2 * k + 2, :m.shape[1]]) for k, (_, m) in enumerate(got))
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        list(cal.batches(0))


@pytest.mark.parametrize("rows,fraction,held", [(32, 0.25, 8), (8, 0.25, 2), (1, 0.25, 0), (4, 0.0, 0), (2, 0.9, 1),
                                                (5, 0.01, 1)])
def test_the_held_out_rows_are_the_last_ones_never_all(rows, fraction, held):
    cal = Calibration.of(ids(rows, 3))
    assert cal.held_out_rows(fraction) == held
    train, out = cal.split_holdout(held)
    assert torch.equal(train.ids, cal.ids[:rows - held])
    assert (out is None) if held == 0 else torch.equal(out.ids, cal.ids[rows - held:])
    with pytest.raises(ValueError, match=f"split_holdout: n must be in \\[0, {rows}\\)"):
        cal.split_holdout(rows)


def test_text_and_the_packaged_sample_are_drawn_as_the_data_loader_draws_them():
    tok = tiny_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog " * 4, "a short one that still has enough bytes " * 3]
    cal = Calibration.from_text(tok, texts, n=3, seq_len=16, seed=2)
    assert torch.equal(cal.ids, calibration_samples(texts, tok, 3, 16, 2)) and bool(cal.mask.all())
    packaged = Calibration.packaged(tok, n=2, seq_len=8, seed=1)
    assert torch.equal(packaged.ids, calibration_samples(PACKAGED_C4, tok, 2, 8, 1))


def test_the_held_out_loss_weighs_every_target_token_alike():
    torch.manual_seed(0)
    table = torch.randn(100, 100)
    logits_for = lambda i, m: table[i]  # a bigram "model": the logits depend on the token alone
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 2:] = 0  # the last row has one target token, the others five each
    cal = Calibration(ids(3, 6), mask)
    ce = torch.nn.functional.cross_entropy(table[cal.ids[:, :-1]].reshape(-1, 100), cal.ids[:, 1:].reshape(-1),
                                           reduction="none").reshape(3, 5)
    by_token = float((ce * mask[:, 1:]).sum() / mask[:, 1:].sum())
    for size in (1, 2, 3):  # however the rows are batched
        assert mean_token_loss(logits_for, cal.batches(size)) == pytest.approx(by_token, rel=1e-6)
    per_row = [float(lm_loss(table[i], i, m)) for i, m in cal.batches(1)]
    assert abs(sum(per_row) / 3 - by_token) > 1e-3  # a plain mean over batches would weigh the short row 5x
