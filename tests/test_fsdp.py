"""Tests for plumbing/fsdp.py: 2 gloo processes (torchrun) against one process, on tiny models
from configs.

The sharded runs happen once per session in `sharded` (tests/fsdp_worker.py, about ten seconds);
each test reads its part. The one-process reference runs the same scenario with masking.py's own
mask_grads / masked_step in this process.

Tolerance: one process and 2 ranks agree to fp32 rounding (PARAM_ATOL), not bit for bit: FSDP
reduce-scatters each layer call's gradient separately and so adds the same terms in another order
than autograd does in one process (SOURCES.md §9.37). Measured: at most 5.3e-7 after 3 steps at
lr 1e-2, where one step moves a weight by about 1e-2. Adam and clipping are scale-invariant, so a
wrong loss normalisation (averaged instead of summed gradients) would not show in the weights:
the grad norm before clipping is the check for it.

Run: .venv/bin/python -m pytest -q tests/test_fsdp.py
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model

import fsdp_worker as W
import masking
import rollout
from plumbing import fsdp
from plumbing.common import qk_modules

PARAM_ATOL = 5e-6  # 10x the measured reduction-order difference (module docstring)
NORM_RTOL = 1e-6


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Rank 0's and rank 1's results of tests/fsdp_worker.py under torchrun, and the run folder."""
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return ranks, out


@pytest.fixture(scope="module")
def reference():
    """The one-process runs of every scenario (masking.py's functions)."""
    torch.set_num_threads(1)
    return {name: W.run(name, sharded=False) for name in W.SCENARIOS}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a) if a else 0.0


# ----------------------------------------------------------------------------- rows of shards
def test_local_row_mask_follows_torch_chunk_including_uneven_and_empty_shards(sharded):
    (r0, r1), _ = sharded
    # 5 rows over 2 ranks: ceil(5 / 2) = 3 on rank 0, 2 on rank 1; mask T F T F T
    assert r0["odd"][5][0].tolist() == [True, False, True] and r0["odd"][5][1] == (3, 4)
    assert r1["odd"][5][0].tolist() == [False, True] and r1["odd"][5][1] == (2, 4)
    # 1 row: rank 1 holds nothing and gets an empty mask
    assert r0["odd"][1][0].tolist() == [True] and r1["odd"][1][0].numel() == 0


def test_local_row_mask_of_a_plain_tensor_is_the_mask_and_shapes_are_checked():
    w = torch.zeros(4, 3)
    m = torch.tensor([True, False, False, True])
    assert torch.equal(fsdp.local_row_mask(w, m), m)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        fsdp.local_row_mask(w, torch.ones(3, dtype=torch.bool))


# ----------------------------------------------------------------------------- collectives
def test_counts_and_saliency_accumulators_are_summed_over_ranks(sharded):
    (r0, r1), _ = sharded
    for r in (r0, r1):
        # rank 0: 3 tokens in 1 sequence; rank 1: 3 + 5 tokens in 2 sequences (one empty row)
        assert r["coll"]["counts"] == (11, 3)
        acc = r["coll"]["state"]  # values [1, 2] * (rank + 1), tokens 10 + rank, seqs 1 + rank
        assert acc["value"].tolist() == [3.0, 6.0] and acc["tokens"] == 21
        assert acc["sequences"] == 3
        assert r["coll"]["main"] == "run-of-rank-0"  # rank 0's choice everywhere
        assert r["coll"]["numbers"] == [[3, 10], [1, 0], [2, 10]]  # sum, min, max of [1|2, 0|10]


def test_each_rank_takes_its_contiguous_share_and_log_rows_are_averaged(sharded, monkeypatch):
    (r0, r1), _ = sharded
    assert r0["coll"]["share"] == [0, 1] and r1["coll"]["share"] == [2, 3]
    for r in (r0, r1):
        assert r["coll"]["mean"] == {"reward": 0.5, "step": 7.0, "tag": "x"}
    monkeypatch.setattr(fsdp, "world", lambda: 2)
    with pytest.raises(ValueError, match="3 prompts do not split over 2 ranks"):
        fsdp.my_share([1, 2, 3])


def test_same_width_pads_every_rank_to_the_widest_completion_with_mask_zero(sharded):
    (r0, r1), _ = sharded
    ids, mask = r0["coll"]["width"]
    assert ids.tolist() == [[7, 7, 7, 2, 2]] and mask.tolist() == [[1, 1, 1, 0, 0]]
    ids, mask = r1["coll"]["width"]
    assert ids.tolist() == [[7] * 5] and mask.tolist() == [[1] * 5]


def test_unequal_work_or_masks_raise_on_every_rank_instead_of_hanging(sharded):
    (r0, r1), _ = sharded
    for r in (r0, r1):
        assert "ranks differ (0 to 1" in r["coll"]["errors"]["count"]
        assert "different row masks" in r["coll"]["errors"]["masks"]


def test_init_distributed_without_torchrun_says_how_to_launch(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        fsdp.init_distributed()
    assert fsdp.world() == 1 and fsdp.rank() == 0 and fsdp.is_main()


def test_a_sharded_model_without_gradients_gives_the_reference_log_probs(sharded):
    (r0, r1), _ = sharded
    plain = W.tiny("qwen2", 3, False)
    r, _ = W.step_batch(0)
    with torch.no_grad():
        want = rollout.completion_logprobs(plain, r)  # (B, T) all 4 groups
    got = torch.cat([r0["ref_logp"], r1["ref_logp"]])  # rank 0: groups 0, 1; rank 1: 2, 3
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_generate_keeps_ranks_in_step_when_they_decode_different_lengths(sharded):
    (r0, r1), _ = sharded
    plain = W.tiny("qwen2", 3, False)
    assert torch.equal(r0["qwen2_kv3"]["greedy_uneven"], W.greedy(plain, 2))
    assert torch.equal(r1["qwen2_kv3"]["greedy_uneven"], W.greedy(plain, 5))


# ----------------------------------------------------------------------------- masked training
@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_two_ranks_match_one_process_within_fp32_rounding(sharded, reference, name):
    (r0, _), _ = sharded
    got, ref = r0[name], reference[name]
    assert torch.equal(got["greedy"], ref["greedy"])  # generate through the sharded root
    for s in range(W.STEPS + 1):
        assert max_diff(got["snaps"][s]["params"], ref["snaps"][s]["params"]) <= PARAM_ATOL, s
        assert max_diff(got["snaps"][s]["moments"], ref["snaps"][s]["moments"]) <= PARAM_ATOL, s
    for g, r in zip(got["info"], ref["info"]):
        # the global norm before clipping: catches an averaged instead of summed gradient
        assert g["norm"] == pytest.approx(r["norm"], rel=NORM_RTOL)
        assert g["drift"] == pytest.approx(r["drift"], rel=1e-5, abs=0.0)


def test_frozen_rows_are_bit_identical_in_parameters_and_adam_moments(sharded):
    (r0, _), _ = sharded
    run = r0["qwen2_kv3"]
    plain = W.tiny("qwen2", 3, False)  # only for module names and shapes
    checked = 0
    for s in range(W.STEPS):
        before, after = run["snaps"][s], run["snaps"][s + 1]
        for module, m in W.step_masks(plain, s).items():
            for pname in ("weight", "bias"):  # q/k bias rows follow their weight's rows
                n = f"{module}.{pname}"
                out = ~m
                assert torch.equal(after["params"][n][out], before["params"][n][out]), (s, n)
                for k in ("exp_avg", "exp_avg_sq"):
                    old = before["moments"].get(f"{n}:{k}")
                    old = torch.zeros_like(after["params"][n]) if old is None else old
                    assert torch.equal(after["moments"][f"{n}:{k}"][out], old[out]), (s, n, k)
                assert not torch.equal(after["params"][n][m], before["params"][n][m])  # trained
                checked += 1
    assert checked == W.STEPS * 2 * 2 * 2  # steps x layers x (q, k) x (weight, bias)
    assert all(i["drift"] == 0.0 for i in run["info"])


def test_grad_semantics_lets_decay_move_rows_outside_the_mask(sharded):
    (r0, _), _ = sharded
    assert all(i["drift"] > 0.0 for i in r0["llama_tied"]["info"])  # weight decay, momentum


def test_local_functions_equal_masking_py_in_one_process():
    """fsdp.mask_grads / masked_step on plain tensors = masking.py's, bit for bit."""
    results = []
    for mod in (masking, fsdp):
        model = tiny_model("qwen2")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(0)
        for step in range(2):
            masks = masking.build_masks({n: torch.rand(m.weight.shape[0], generator=g)
                                         for n, m in qk_modules(model).items()},
                                        head_dim=8)
            opt.zero_grad()
            model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits.square().mean().backward()
            mod.mask_grads(model, masks)
            mod.masked_step(opt, model, masks, "frozen")
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


# ----------------------------------------------------------------------------- checkpoints
def test_resume_from_step_two_equals_three_straight_steps_bit_for_bit(sharded):
    (r0, _), out = sharded
    res = r0["resumed"]
    assert res["extra"] == {"step": 2}
    assert (out / "ckpt" / ".metadata").exists() and not (out / "ckpt.tmp").exists()
    straight = r0["qwen2_kv3"]["snaps"][W.STEPS]
    assert max_diff(res["snap"]["params"], straight["params"]) == 0.0
    assert max_diff(res["snap"]["moments"], straight["moments"]) == 0.0


@pytest.mark.parametrize("name, folder, cls", [("qwen2_kv3", "hf", "Qwen2ForCausalLM"),
                                               ("llama_tied", "hf_tied", "LlamaForCausalLM")])
def test_export_writes_a_plain_hugging_face_folder_with_the_trained_weights(sharded, name, folder,
                                                                            cls):
    from plumbing.policy import load_weights  # hub kernels off, no remote code (SOURCES.md §9.44)
    (r0, _), out = sharded
    model = load_weights(out / folder)
    assert type(model).__name__ == cls
    final = r0[name]["snaps"][W.STEPS]["params"]
    got = dict(model.named_parameters(remove_duplicate=False))
    assert max_diff({n: got[n].detach() for n in final}, final) == 0.0
    if name == "llama_tied":  # the head is the embedding again, not a copy
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
