"""KTO: the loss by hand, the reference point, the mismatched responses, and the method in the trainer.

The generic loss properties (padding, masking, gradcheck, shapes, paired metrics) run for KTO in
test_losses.py; training from the reference cache equals a live reference in test_refcache.py.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

from sparsealign.config import ConfigError
from sparsealign.data.collate import collate_mismatched, collate_pairs
from sparsealign.data.examples import TokenizedPair
from sparsealign.data.mismatched import with_mismatched_responses
from sparsealign.losses import kto_loss, kto_reference_point
from sparsealign.methods import get_method
from sparsealign.models.loading import load_bundle
from sparsealign.models.logprobs import TokenModel
from sparsealign.recipes.load import load_config
from sparsealign.refcache import CacheError
from sparsealign.refcache.store import read_header, split_file
from sparsealign.train.loop import train
from sparsealign.train.reference_cache import cache_run
from sparsealign.train.step import step_inputs, step_outputs

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def hand_batch() -> dict[str, torch.Tensor]:
    """Summed log-ratios: chosen [0.5, 1.0], rejected [−0.5, −1.0] (the batch of test_losses.py)."""
    return {
        "policy_chosen_logps": t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]]),
        "policy_rejected_logps": t([[-2.0, -1.0, -1.0], [-3.0, 0.0, 0.0]]),
        "ref_chosen_logps": t([[-1.5, -2.0, 0.0], [-1.0, -1.0, -1.0]]),
        "ref_rejected_logps": t([[-1.5, -1.0, -1.0], [-2.0, 0.0, 0.0]]),
        "mask_chosen": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        "mask_rejected": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
    }


# --- the loss ------------------------------------------------------------------------------------------


def test_kto_by_hand():
    """β = 0.5, z₀ = 0.25.

    desirable:   1 − σ(0.5 · (0.5 − 0.25)) = 1 − σ(0.125);   1 − σ(0.5 · (1.0 − 0.25)) = 1 − σ(0.375)
    undesirable: 1 − σ(0.5 · (0.25 + 0.5)) = 1 − σ(0.375);   1 − σ(0.5 · (0.25 + 1.0)) = 1 − σ(0.625)
    per pair: the mean of its two examples.
    """
    out = kto_loss(**hand_batch(), reference_point=0.25, beta=0.5)
    expected = t(
        [
            (2 - sigmoid(0.125) - sigmoid(0.375)) / 2,
            (2 - sigmoid(0.375) - sigmoid(0.625)) / 2,
        ]
    )
    assert_close(out.per_example, expected)
    assert_close(out.loss, expected.mean())
    assert_close(out.metrics["kl"], torch.tensor(0.25))
    assert_close(out.metrics["rewards/chosen"], torch.tensor(0.5 * 0.75))  # β · mean([0.5, 1.0])
    assert_close(out.metrics["rewards/rejected"], torch.tensor(-0.5 * 0.75))


def test_kto_weights_by_hand():
    """λ_D = 2, λ_U = 0.5 scale each side's loss: pair 1 = (2 (1 − σ(0.125)) + 0.5 (1 − σ(0.375))) / 2."""
    out = kto_loss(
        **hand_batch(), reference_point=0.25, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5
    )
    first = (2 * (1 - sigmoid(0.125)) + 0.5 * (1 - sigmoid(0.375))) / 2
    assert_close(out.per_example[0], torch.tensor(first))


def test_kto_at_reference_with_zero_reference_point_is_one_half():
    b = hand_batch()
    b["ref_chosen_logps"], b["ref_rejected_logps"] = b["policy_chosen_logps"], b["policy_rejected_logps"]
    assert_close(kto_loss(**b, reference_point=0.0, beta=0.3).per_example, t([0.5, 0.5]))


def test_a_zero_weight_side_gets_no_gradient():
    b = {k: v.clone() for k, v in hand_batch().items()}
    for key in ("policy_chosen_logps", "policy_rejected_logps"):
        b[key].requires_grad_(True)
    kto_loss(**b, reference_point=0.1, desirable_weight=0.0).loss.backward()
    assert (b["policy_chosen_logps"].grad == 0).all()
    assert (b["policy_rejected_logps"].grad[b["mask_rejected"]] > 0).all()  # descent lowers the rejected


def test_bad_kto_settings_are_refused():
    with pytest.raises(ValueError, match="beta"):
        kto_loss(**hand_batch(), reference_point=0.0, beta=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        kto_loss(**hand_batch(), reference_point=0.0, undesirable_weight=-1.0)


# --- the reference point -------------------------------------------------------------------------------


def test_reference_point_by_hand_clamped_and_detached():
    """Mismatched rows: Σ (π − ref) = [(−1 + 2) + (−2 + 2), −3 + 1] = [1, −2] (row 2's second token is
    padding); the mean −0.5 clamps to 0. Shifting row 2's policy up by 4 gives [1, 2]: z₀ = 1.5."""
    policy = t([[-1.0, -2.0], [-3.0, 9.0]]).requires_grad_(True)
    ref = t([[-2.0, -2.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    assert_close(kto_reference_point(policy, ref, mask), torch.tensor(0.0))
    shifted = (policy + t([[0.0, 0.0], [4.0, 0.0]])).detach().requires_grad_(True)
    z0 = kto_reference_point(shifted, ref, mask)
    assert_close(z0, torch.tensor(1.5))
    assert not z0.requires_grad  # no gradient flows through the reference point
    assert_close(kto_reference_point(shifted, ref, mask, average=torch.max), torch.tensor(2.0))


def _mean_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from sparsealign.methods.kto import mean_over_processes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values = [torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([-4.0, 2.0])][rank]  # 2B rows: B = 2 and 1
    results[rank] = float(mean_over_processes(values))
    dist.destroy_process_group()


def test_reference_point_is_the_mean_over_all_processes():
    """Each process holds its batch's 2B mismatched rows: rank 0 (B = 2) the log-ratios [1, 2, 3, 2], rank 1
    (B = 1, a short last batch) [−4, 2]. Both use (1 + 2 + 3 + 2 − 4 + 2) / 6 = 1 (not the mean of the
    per-process means, (2 − 1) / 2 = 0.5), so every process trains against the same z₀."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_mean_worker, args=(port, results), nprocs=2)
    assert dict(results) == {0: 1.0, 1: 1.0}


def test_reference_point_from_the_2b_mismatched_rows_by_hand():
    """B = 2 pairs give 4 mismatched rows (chosen rows' then rejected rows', as collated). Summed log-ratios
    over the real tokens: row 0 (−1 + 2) + (−1 + 1) = 1, row 1 −1.5 + 1 = −0.5, row 2 −1 + 3 = 2, row 3
    −2 + 2.5 = 0.5 (rows 1-3 have one real token). z₀ = (1 − 0.5 + 2 + 0.5) / 4 = 0.75; the chosen rows
    alone (the old layout) would give 0.25."""
    pairs = with_mismatched_responses([TokenizedPair([1, 2], [3], [4]), TokenizedPair([5], [6, 7], [8])], 8)
    mask = collate_mismatched(pairs, pad_id=0).response_mask
    assert mask.tolist() == [[True, True], [True, False], [True, False], [True, False]]
    policy = t([[-1.0, -1.0], [-1.5, 7.0], [-1.0, 5.0], [-2.0, 0.0]])
    ref = t([[-2.0, -1.0], [-1.0, 0.0], [-3.0, 0.0], [-2.5, 0.0]])
    assert_close(kto_reference_point(policy, ref, mask), torch.tensor(0.75))
    from sparsealign.methods.kto import mean_over_processes

    assert_close(kto_reference_point(policy, ref, mask, average=mean_over_processes), torch.tensor(0.75))
    assert_close(kto_reference_point(policy[:2], ref[:2], mask[:2]), torch.tensor(0.25))


# --- mismatched responses ------------------------------------------------------------------------------


def _prompt_of(pairs: list[TokenizedPair]) -> dict[int, list[int]]:
    """The prompt each (one-token, distinct) response of ``pairs`` was written for."""
    return {r[0]: p.prompt_ids for p in pairs for r in (p.chosen_ids, p.rejected_ids)}


def test_mismatched_responses_follow_the_flattened_split():
    """Flattened as TRL unpairs and the batch lays out rows: items 0-4 the chosen responses 10-14, items 5-9
    the rejected 20-24. Each item takes the next item's response with another prompt (prompts: 1 1 2 3 3 |
    1 1 2 3 3): 0 → 2 (12), 1 → 2, 2 → 3 (13), 3 → 5 (20), 4 → 5, 5 → 7 (22), 6 → 7, 7 → 8 (23), 8 → 0 (10),
    9 → 0. The chosen rows of pairs 3 and 4 wrap onto a rejected response, their rejected rows onto a
    chosen one."""
    pairs = [
        TokenizedPair([1], [10], [20]),
        TokenizedPair([1], [11], [21]),  # same prompt as pair 0: skipped as a partner
        TokenizedPair([2], [12], [22]),
        TokenizedPair([3, 3, 3], [13], [23]),
        TokenizedPair([3, 3, 3], [14], [24]),
    ]
    out = with_mismatched_responses(pairs, max_length=5)
    assert [p.mismatched_ids for p in out] == [
        ([12], [22]),
        ([12], [22]),
        ([13], [23]),
        ([20], [10]),
        ([20], [10]),
    ]
    written_for = _prompt_of(pairs)
    rows = [(p.prompt_ids, r) for p in out for r in p.mismatched_ids]
    assert all(written_for[r[0]] != prompt for prompt, r in rows)  # never the row's own prompt
    used = {r[0] for _, r in rows}
    assert used & {10, 11, 12, 13, 14} and used & {20, 21, 22, 23, 24}  # desirable and undesirable both
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in out] == [
        (p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs
    ]
    assert pairs[0].mismatched_ids is None  # copies; the input is untouched


def test_without_repeated_prompts_the_mismatched_responses_are_all_the_responses_once():
    """Over a split with distinct prompts the 2n mismatched responses are the n chosen and the n rejected
    responses, each once (the same set as the rewarded ones, TRL's advice), never the row's own prompt's."""
    pairs = [TokenizedPair([p], [10 + p], [20 + p]) for p in range(1, 6)]
    out = with_mismatched_responses(pairs, max_length=8)
    assert [p.mismatched_ids for p in out] == [
        ([12], [22]),
        ([13], [23]),
        ([14], [24]),
        ([15], [25]),
        ([21], [11]),
    ]
    used = sorted(r[0] for p in out for r in p.mismatched_ids)
    assert used == sorted([10 + p for p in range(1, 6)] + [20 + p for p in range(1, 6)])


def test_mismatched_responses_are_cut_to_max_length():
    """max_length 5. Pair 0 (prompt of 3): room for 2 tokens, [5, 6, 7] → [5, 6] and [15, 16, 17, 18] →
    [15, 16]. Pair 1 (prompt of 1, room 4) wraps: its chosen row gets pair 0's rejected [8], its rejected row
    pair 0's chosen [9]. A prompt that fills max_length still gets one response token."""
    pairs = [TokenizedPair([1, 2, 3], [9], [8]), TokenizedPair([4], [5, 6, 7], [15, 16, 17, 18])]
    out = with_mismatched_responses(pairs, max_length=5)
    assert [p.mismatched_ids for p in out] == [([5, 6], [15, 16]), ([8], [9])]
    full = with_mismatched_responses([TokenizedPair([1] * 5, [2], [3]), TokenizedPair([4], [5, 6], [7])], 5)
    assert full[0].mismatched_ids == ([5], [7])


def test_one_prompt_split_takes_the_next_item():
    """No other prompt to borrow from: item k takes item k + 1 (items c10 c11 r20 r21); one pair alone gets
    its own responses swapped."""
    pairs = [TokenizedPair([1], [10], [20]), TokenizedPair([1], [11], [21])]
    assert [p.mismatched_ids for p in with_mismatched_responses(pairs, 5)] == [([11], [21]), ([20], [10])]
    assert with_mismatched_responses(pairs[:1], 5)[0].mismatched_ids == ([20], [10])
    assert with_mismatched_responses([], 5) == []


def test_mismatched_rows_collate_as_the_pairs_do():
    """Items c[3] c[6, 7] r[4] r[8]: pair 0 gets ([6, 7], [8]), pair 1 ([4], [3]). Rows 0-1 are the chosen
    rows' mismatches, rows 2-3 the rejected rows', each prompt continued by its response."""
    pairs = with_mismatched_responses([TokenizedPair([1, 2], [3], [4]), TokenizedPair([5], [6, 7], [8])], 8)
    assert [p.mismatched_ids for p in pairs] == [([6, 7], [8]), ([4], [3])]
    rows = collate_mismatched(pairs, pad_id=0)
    assert rows.num_pairs == 2
    assert rows.input_ids.tolist() == [[1, 2, 6, 7], [5, 4, 0, 0], [1, 2, 8, 0], [5, 3, 0, 0]]
    assert rows.response_ids.tolist() == [[6, 7], [4, 0], [8, 0], [3, 0]]
    assert rows.response_index.tolist() == [[1, 2], [0, 0], [1, 0], [0, 0]]
    left = collate_mismatched(pairs, pad_id=0, padding_side="left")
    assert left.input_ids.tolist() == [[1, 2, 6, 7], [0, 0, 5, 4], [0, 1, 2, 8], [0, 0, 5, 3]]
    with pytest.raises(ValueError, match="no mismatched responses"):
        collate_mismatched([TokenizedPair([1], [2], [3])], pad_id=0)


# --- the method ----------------------------------------------------------------------------------------


def smoke(out: Path, *overrides: str):
    base = [
        f"output_dir={out}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
        "train.max_steps=2",
        "train.save_every=0",
        "train.eval_every=0",
        "method.name=kto",
    ]
    return load_config(SMOKE, base + list(overrides))


def test_kto_step_uses_the_mismatched_rows_without_gradients(tmp_path):
    cfg = smoke(tmp_path)
    bundle = load_bundle(cfg.model, 0, need_reference=False)
    pairs = with_mismatched_responses(
        [TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12]), TokenizedPair([13, 14], [15], [16, 17])], 16
    )
    batch = collate_pairs(pairs, bundle.tokenizer.pad_token_id)
    policy = TokenModel(bundle.policy).train()
    out = step_outputs(policy, step_inputs(cfg, get_method("kto"), bundle, batch, pairs))
    expected = TokenModel(bundle.policy)(collate_mismatched(pairs, bundle.tokenizer.pad_token_id))
    assert out.mismatched_policy.logps.shape[0] == out.mismatched_reference.logps.shape[0] == 4  # 2B rows
    assert_close(out.mismatched_policy.logps, expected.logps.detach())
    assert not out.mismatched_policy.logps.requires_grad  # the reference point is detached: no graph
    assert out.policy.logps.requires_grad
    assert_close(out.mismatched_reference.logps, expected.logps.detach())  # untrained: policy = reference
    with pytest.raises(ValueError, match="pairs the batch was collated from"):
        step_outputs(policy, step_inputs(cfg, get_method("kto"), bundle, batch))


def test_kto_trains_and_logs_the_reference_point(tmp_path):
    result = train(smoke(tmp_path, "method.desirable_weight=1.33"))
    assert result.steps == 2
    assert "kl" in result.final_metrics and result.final_metrics["kl"] >= 0


def test_kto_settings_are_checked(tmp_path, caplog):
    with pytest.raises(ConfigError, match="desirable_weight' has no effect with method 'dpo'"):
        smoke(tmp_path, "method.name=dpo", "method.desirable_weight=2.0")
    with pytest.raises(ConfigError, match=">= 0"):
        smoke(tmp_path, "method.undesirable_weight=-1")
    smoke(tmp_path, "method.desirable_weight=1.33")
    assert "recommends" not in caplog.text
    cfg = smoke(tmp_path, "method.undesirable_weight=2.0")  # ratio 0.5: allowed, with the paper's advice
    from sparsealign.methods.kto import check_class_balance

    check_class_balance([True] * 4 + [False] * 4, cfg.method)  # paired data: as many of each kind
    assert "the KTO paper recommends [1, 4/3]. Set method.desirable_weight in [2, 2.67]" in caplog.text


def test_a_kto_cache_serves_dpo_and_a_dpo_cache_is_refused_for_kto(tmp_path, monkeypatch):
    from sparsealign.models import loading

    kto_cache, dpo_cache = tmp_path / "kto-cache", tmp_path / "dpo-cache"
    cache_run(smoke(tmp_path / "a", f"reference.cache={kto_cache}"))
    header = read_header(split_file(kto_cache, "train"))
    assert header["mismatched_responses"] is True
    from safetensors.torch import load_file

    stored = load_file(str(split_file(kto_cache, "train")))
    assert len(stored["mismatched_keys"]) == 2 * header["pairs"]  # a chosen and a rejected row per pair
    cache_run(smoke(tmp_path / "b", "method.name=dpo", f"reference.cache={dpo_cache}"))
    assert read_header(split_file(dpo_cache, "train"))["mismatched_responses"] is False
    monkeypatch.setattr(loading, "frozen_copy", lambda *a: pytest.fail("reference copied"))
    train(smoke(tmp_path / "c", "method.name=dpo", f"reference.cache={kto_cache}"))  # serves DPO
    with pytest.raises(CacheError, match="mismatched responses, for KTO"):
        train(smoke(tmp_path / "d", f"reference.cache={dpo_cache}", "reference.build_missing=false"))


@pytest.mark.parametrize("zero", [0.0, 0, torch.tensor(0.0)])
def test_kto_zero_by_hand(zero):
    """KTO-zero (HALOs' KTOZero) is KTO with z₀ fixed at 0, no mismatched forward. β = 0.5, z₀ = 0 (as a float, an int or a tensor):

    desirable:   1 − σ(0.5 · 0.5) = 1 − σ(0.25);     1 − σ(0.5 · 1.0) = 1 − σ(0.5)
    undesirable: 1 − σ(0.5 · 0.5) = 1 − σ(0.25);     1 − σ(0.5 · 1.0) = 1 − σ(0.5)
    per pair: the mean of its two items, so [1 − σ(0.25), 1 − σ(0.5)]; the ``kl`` metric is 0.
    """
    out = kto_loss(**hand_batch(), reference_point=zero, beta=0.5)
    expected = t([1 - sigmoid(0.25), 1 - sigmoid(0.5)])
    assert_close(out.per_example, expected)
    assert_close(out.loss, expected.mean())
    assert_close(out.metrics["kl"], torch.tensor(0.0))
    assert_close(out.metrics["rewards/chosen"], torch.tensor(0.5 * 0.75))


def test_kto_zero_gradients_by_hand():
    """d/dπ of (1 − σ(β r)) / 2 / B at every chosen token is −β σ'(β r) / (2B), σ' = σ (1 − σ);
    for the rejected side, (1 − σ(−β r)) gives +β σ'(β r) / (2B). β = 0.5, B = 2."""
    b = {k: v.clone() for k, v in hand_batch().items()}
    b["policy_chosen_logps"].requires_grad_(True)
    b["policy_rejected_logps"].requires_grad_(True)
    kto_loss(**b, reference_point=0.0, beta=0.5).loss.backward()

    def slope(x: float) -> float:
        return sigmoid(x) * (1 - sigmoid(x))

    chosen = [-0.5 * slope(0.5 * r) / 4 for r in (0.5, 1.0)]
    rejected = [0.5 * slope(-0.5 * r) / 4 for r in (-0.5, -1.0)]
    assert_close(b["policy_chosen_logps"].grad, t(chosen)[:, None] * b["mask_chosen"].float())
    assert_close(b["policy_rejected_logps"].grad, t(rejected)[:, None] * b["mask_rejected"].float())
