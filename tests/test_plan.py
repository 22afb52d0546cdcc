"""The memory plan (plumbing/plan.py) against real tensors of tiny Qwen3 models, and its verdicts.

  * parameter, gradient and optimizer-state bytes equal those of a model built from the config,
    after one optimizer step, for every precision option (exact);
  * the saved activations of the shared-prompt update (rollout.group_logprobs with gradients) are
    within 25% of what torch's saved-tensor hooks see, with and without gradient checkpointing;
  * the published Qwen3-4B / 8B configs give 4.02 B / 8.19 B parameters, and the paper setting
    fits one 141 GB GPU with 10% headroom for Qwen3-8B only with bf16 weights and moments.

Run: .venv/bin/python -m pytest -q tests/test_plan.py
"""

import json
from types import SimpleNamespace

import pytest
import torch
import transformers

import rollout
import train
from plumbing import engine, optim, plan, policy, runner, timeplan
from conftest import tiny_model
from live_bytes import LiveBytes

TINY = dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
SMALL = dict(prompt_len=64, group_size=4, new_tokens=16)
DTYPES = {"adamw": torch.float32, "bf16-sr": torch.bfloat16,
          "bf16-sr-fp32-moments": torch.bfloat16}


def tiny_qwen3(tied: bool, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**TINY, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                                          dtype=dtype)
    return cfg, model.train()


def make_optimizer(name, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    state = torch.float32 if name == "bf16-sr-fp32-moments" else None
    return optim.AdamWSR(params, lr=1e-3, state_dtype=state)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rows_by_item(rows, phase="update") -> dict:
    return {r["item"]: r["bytes"] for r in rows if r["phase"] == phase}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", sorted(plan.OPTIMIZERS))
def test_weight_gradient_and_state_bytes_equal_the_real_tensors(name, tied):
    cfg, model = tiny_qwen3(tied, DTYPES[name])
    opt = make_optimizer(name, model.parameters())
    prompt, comp = list(range(3, 19)), torch.randint(3, 256, (2, 5))
    rollout.group_logprobs(model, prompt, comp).sum().backward()
    opt.step()
    params = list(model.parameters())  # a tied embedding is listed once
    state = [t for s in opt.state.values() for t in s.values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]  # not torch's 0-d step counters
    got = rows_by_item(plan.plan(cfg, plan.Settings(optimizer=name, **SMALL)))
    assert got["weights"] == nbytes(params)
    assert got["gradients"] == nbytes(p.grad for p in params)
    assert got["optimizer state (AdamW m, v)"] == nbytes(state)
    assert got["reference model, bf16, frozen"] == 2 * sum(p.numel() for p in params)


def test_autocast_copies_are_two_bytes_per_matmul_weight():
    cfg, model = tiny_qwen3(tied=True)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    got = rows_by_item(plan.plan(cfg, plan.Settings(optimizer="adamw", **SMALL)))
    assert got["bf16 weight copies made by autocast"] == 2 * linear
    none = rows_by_item(plan.plan(cfg, plan.Settings(optimizer="bf16-sr", **SMALL)))
    assert none["bf16 weight copies made by autocast"] == 0


def saved_bytes_measured(model, settings) -> int:
    """Bytes of the distinct storages autograd saves in a group_logprobs forward, parameters
    excluded (deduplicated by storage: views and repeated saves count once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 256, (settings.prompt_len,), generator=gen).tolist()
    comp = torch.randint(3, 256, (settings.group_size, settings.new_tokens), generator=gen)
    autocast = settings.optimizer == "adamw" and settings.autocast
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        rollout.group_logprobs(model, prompt, comp)
    return sum(seen.values())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames checkpointing calls
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name,autocast", [("adamw", False), ("adamw", True),
                                           ("bf16-sr", False)])
def test_saved_activation_estimate_is_within_25_percent_of_saved_tensor_hooks(
        name, autocast, checkpointing):
    cfg, model = tiny_qwen3(tied=False, dtype=DTYPES[name])
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    s = plan.Settings(optimizer=name, autocast=autocast, grad_checkpointing=checkpointing, **SMALL)
    estimate = plan.saved_activation_bytes(plan.plan(cfg, s))
    measured = saved_bytes_measured(model, s)
    assert estimate == pytest.approx(measured, rel=0.25)


def test_checkpointing_saves_far_less_than_keeping_every_layer():
    cfg = transformers.Qwen3Config(**TINY)
    on = plan.saved_activation_bytes(plan.plan(cfg, plan.Settings(**SMALL)))
    off = plan.saved_activation_bytes(plan.plan(cfg, plan.Settings(grad_checkpointing=False,
                                                                   **SMALL)))
    assert off > 5 * on


def meta_param_count(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,hub,billions", [("qwen3-4b", "Qwen/Qwen3-4B", 4.02),
                                               ("qwen3-8b", "Qwen/Qwen3-8B", 8.19)])
def test_published_configs_give_the_published_parameter_counts(name, hub, billions):
    cfg = policy.model_config(name)
    n = plan.param_counts(cfg)["total"]
    assert n == meta_param_count(cfg)
    assert n / 1e9 == pytest.approx(billions, abs=0.005)
    assert policy.model_config(hub).to_dict() == cfg.to_dict()  # hub ids resolve offline


def test_paper_setting_fits_one_h200_for_qwen3_8b_only_with_bf16_weights_and_moments():
    cfg = policy.model_config("qwen3-8b")
    budget = 0.9 * 141
    sr = plan.peaks(plan.plan(cfg, plan.Settings(optimizer="bf16-sr")))
    assert sr["update"] <= budget and sr["sampling"] <= budget and sr["step"] <= budget
    fp32 = plan.peaks(plan.plan(cfg, plan.Settings(optimizer="adamw")))
    assert fp32["update"] > 141  # the 16-bytes-per-parameter recipe does not fit at all
    mixed = plan.peaks(plan.plan(cfg, plan.Settings(optimizer="bf16-sr-fp32-moments")))
    assert mixed["update"] > budget  # fp32 moments eat the headroom


def test_sampling_kv_cache_is_hand_computable():
    # Qwen3-8B, one group: the prompt's 16383 cached positions once + 8 rows x 1024 suffix
    # positions, 36 layers, 8 KV heads of 128, bf16 keys and values (2 + 2 bytes)
    rows = plan.plan(policy.model_config("qwen3-8b"), plan.Settings())
    kv = rows_by_item(rows, "sampling")["KV cache (cascade: prefix once per prompt)"]
    assert kv == (16383 + 8 * 1024) * 36 * 8 * 128 * 4
    four = plan.plan(policy.model_config("qwen3-8b"), plan.Settings(prompts_per_generate=4))
    assert rows_by_item(four, "sampling")["KV cache (cascade: prefix once per prompt)"] == 4 * kv


def test_paper_presets_size_groups_per_call_and_eval_batch_from_the_plan():
    for preset in ("paper", "paper-8b"):
        args = train.parse_args(["--preset", preset])
        assert args.gen_groups > 2 and args.eval_batch > 1  # not the old 1-2 groups per call
        assert set(args.plan_reasons) == {"gen_groups", "eval_batch"}
        peaks = plan.memory_peaks(plan.plan_for_args(args))
        assert max(peaks.values()) <= 0.9 * 141
        more = train.parse_args(["--preset", preset, "--gen-groups", str(args.gen_groups + 6)])
        assert plan.memory_peaks(plan.plan_for_args(more))["sampling"] > 0.9 * 141
    assert plan.settings_for_args(train.parse_args(["--preset", "paper-8b", "--beta", "0"])) \
        .reference is False


def test_paper_8b_plan_prints_sampling_update_evaluation_disk_and_time(capsys):
    train.main(["--preset", "paper-8b", "--plan"])
    out = capsys.readouterr().out
    for phase in ("sampling", "update", "step", "evaluation", "disk"):
        assert f"| {phase} | **peak** |" in out
    assert "Time plan on one H200 SXM (an ESTIMATE" in out and "| whole run |" in out
    assert "--gen-groups" in out and "--eval-batch" in out
    assert "| disk | model download into the hub cache (once) |" in out  # not cached here
    assert "| phase | expected | worst case | how |" in out
    for phase in ("one LongBench v2 evaluation", "LongBench v2, every evaluation",
                  "checkpoint writes", "one evaluation"):
        assert f"| {phase} |" in out


def test_the_time_plan_counts_every_evaluation_and_the_worst_case(tmp_path):
    args = train.parse_args(["--preset", "paper-8b"])
    rows = {r["phase"]: r for r in timeplan.time_plan_for_args(args)}
    whole, step = rows["whole run"], rows["one RL step"]
    assert step["expected"] < step["worst"] and whole["expected"] < whole["worst"]
    assert "expected: 512 new tokens" in whole["how"]  # half of --max-new-tokens 1024
    lb = rows["LongBench v2, every evaluation"]
    assert lb["expected"] == pytest.approx(5 * rows["one LongBench v2 evaluation"]["expected"])
    assert "503 hub items, each at the cap 40832" in rows["one LongBench v2 evaluation"]["how"]
    steps = sum(rows[p]["worst"] for p in ("sampling", "update", "optimizer step"))
    assert whole["worst"] == pytest.approx(200 * steps + 5 * rows["one evaluation"]["worst"]
                                           + lb["worst"] + rows["checkpoint writes"]["worst"])
    # a local file: each item's characters / 4, capped at the window
    data = tmp_path / "lb.jsonl"
    item = {"_id": "a", "domain": "d", "sub_domain": "s", "difficulty": "easy", "length": "short",
            "question": "q", "choice_A": "a", "choice_B": "b", "choice_C": "c", "choice_D": "d",
            "answer": "A", "context": "x" * 39_995}
    data.write_text(json.dumps(item) + "\n" + json.dumps(dict(item, _id="b", context="y" * 10**6))
                    + "\n")
    lengths, how = timeplan.longbench_lengths(
        train.parse_args(["--preset", "paper-8b", "--longbench", str(data)]),
        timeplan.model_config("qwen3-8b"))
    assert lengths == [10_000, 40_832] and how.startswith("2 items of")


def cache_nbytes(cache) -> int:
    """Bytes of every tensor a KV cache holds (cascade prefixes included)."""
    return sum(t.nbytes for layer in cache.layers
               for t in (layer.keys, layer.values, getattr(layer, "prefix_keys", None),
                         getattr(layer, "prefix_values", None)) if t is not None)


@pytest.mark.parametrize("G, temperature", [(4, 1.0), (1, 0.0)])  # sampling; greedy evaluation
def test_the_plans_cache_row_is_the_real_cache_within_10_percent(monkeypatch, G, temperature):
    model = tiny_model("qwen3")
    model.generation_config.eos_token_id = None  # the tokenizer's 127 ends a row
    seen, real = [], engine.decode

    def spy(*args, **kwargs):  # the cache object at the end of decoding, its largest
        out = real(*args, **kwargs)
        seen.append(cache_nbytes(kwargs["cache"]))
        return out
    monkeypatch.setattr(engine, "decode", spy)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=127,  # rows that stop early still
                          batch_decode=lambda ids, **k: [""] * len(ids))
    prompts = [list(range(3, 3 + n)) for n in (40, 33, 29)]
    with torch.no_grad():
        r = rollout.sample_groups(model, tok, prompts, G, 6, temperature=temperature,
                                  greedy_batch=3)
    T = r.completion_ids.shape[1]  # hold their slots: the cache has (N, G, T) suffixes
    s = plan.Settings(optimizer="adamw", autocast=False, prompt_len=40, group_size=G,
                      new_tokens=T, prompts_per_generate=3, eval_len=40, eval_new_tokens=T,
                      eval_batch=3)
    rows = rows_by_item(plan.plan(model.config, s), "evaluation" if G == 1 else "sampling")
    planned = rows["KV cache (cascade: prefix once per prompt)"]
    assert len(seen) == 1 and abs(seen[0] - planned) <= 0.1 * planned, (seen, planned)


def test_prefill_holds_the_batch_cache_once(monkeypatch):
    # live bytes of every tensor made during prefill (tests/live_bytes.py): the batch cache plus
    # one prompt's, not the batch cache twice (per-prompt caches concatenated at the end)
    model = tiny_model("llama", layers=8)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 128, (64,)).tolist() for _ in range(16)]
    with torch.no_grad(), LiveBytes() as live:
        cache = engine.prefill(model, prompts, 2)
    assert live.peak < 1.4 * cache_nbytes(cache), (live.peak, cache_nbytes(cache))


def test_format_plan_prints_one_line_per_row_and_side_by_side_columns():
    cfg = transformers.Qwen3Config(**TINY)
    rows = plan.plan(cfg, plan.Settings(**SMALL))
    table = plan.format_plan(rows)
    assert table.count("\n") == len(rows) + 1  # header, rule, one line per row
    both = plan.format_plan({"a": rows, "b": rows})
    assert both.splitlines()[0] == "| phase | component | a | b |"
    assert "**peak**" in both


def test_cli_prints_the_plan_and_a_verdict(capsys):
    plan.main(["--model", "qwen3-8b", "--optimizer", "bf16-sr"])
    out = capsys.readouterr().out
    assert "| update | **peak** |" in out and "qwen3-8b: largest phase" in out and "fits" in out


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="Settings.optimizer"):
        plan.Settings(optimizer="adam8bit")
    with pytest.raises(ValueError, match="Settings.group_size"):
        plan.Settings(group_size=0)


def test_yarn_is_a_stated_choice_of_window(tiny_dir, tmp_path):
    model, _ = policy.load_policy(tiny_dir, yarn=2.0, yarn_original=1024)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.max_position_embeddings == 2048
    assert model.model.rotary_emb.rope_type == "yarn"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)  # (B, T, V)
    with pytest.raises(SystemExit):  # 65536 is past Qwen3-8B's 40960 without YaRN
        train.parse_args(["--preset", "paper-8b", "--eval-lengths", "65536"])
    args = train.parse_args(["--preset", "paper-8b", "--eval-lengths", "65536", "--yarn", "4"])
    _, how = timeplan.longbench_lengths(args, timeplan.model_config(args.model))
    assert "each at the cap 120000 (--longbench-max-len 120000, window 131072 with YaRN x4)" in how
    # a shared "before" file written before these settings existed still matches the defaults
    now = train.parse_args([])
    now.precision_used = "fp32"  # set by runner.setup
    old = {k: v for k, v in runner.eval_settings(now).items() if k not in runner.EVAL_ADDED_LATER}
    assert (runner.EVAL_ADDED_LATER | old) == runner.eval_settings(now)


def test_the_embedded_default_has_a_plan_too(capsys):
    """`python train.py --plan` with the default model reads its config from the converted folder
    (it once went to the hub, offline here, and failed)."""
    train.main(["--plan"])
    out = capsys.readouterr().out
    assert "| sampling | **peak** |" in out
    assert "model download" not in out  # the embedded model is a wheel, not a download
