"""Document masks and position resets equal Megatron's own `_get_ltor_masks_and_position_ids`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

EOD = 0


def _rows():
    """Windows with EOD at the start, the end, twice in a row, and not at all."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 50, (5, 24), generator=g)
    rows[0, [5, 11, 17]] = EOD
    rows[1, [0, 23]] = EOD
    rows[2, [8, 9]] = EOD
    rows[4, [3, 12, 20]] = EOD
    return rows


@pytest.mark.parametrize("positions, attention, loss", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_masks_positions_and_loss_equal_megatrons(positions, attention, loss):
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from llmforge.runtime.documents import Documents, prepare

    rows = _rows()
    ours_positions, ours_mask, ours_loss = prepare(Documents(EOD, positions, attention, loss), rows, None, None)
    for r, row in enumerate(rows):
        mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(row, EOD, positions, attention, loss, True)
        if positions:
            assert torch.equal(ours_positions[r], position_ids)
        else:
            assert ours_positions is None
        if attention:
            assert torch.equal(ours_mask[r, 0], mask[0])
        else:
            assert ours_mask is None
        if loss:
            assert torch.equal(ours_loss[r], loss_mask)
        else:
            assert ours_loss is None


def test_packed_examples_keep_their_masks_and_drop_the_boundary_targets():
    from llmforge.runtime.documents import PACKED_EXAMPLES, prepare

    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    tokens = torch.arange(8).unsqueeze(0)
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.float32)  # target j is token j + 1
    positions, mask, loss = prepare(PACKED_EXAMPLES, tokens, loss_mask, segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    # Target 2 (token 3) starts example 1 and target 4 (token 5) example 2: neither trains.
    assert loss.tolist() == [[0, 1, 0, 0, 0, 1, 1, 1]]
    assert not mask[0, 0, 4, 3] and mask[0, 0, 4, 2] and mask[0, 0, 3, 4]
