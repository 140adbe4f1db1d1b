"""The trainer with a real Hugging Face model (``--model``, trainer/hf.py): tiny randomly initialised
Llama- and Qwen2-style models and a word-level tokenizer built here (no download).

The adapter against the causal LM's own logits (padding, packing, both heads); KV-cache generation
against recomputation; one step of every algorithm a --model run takes, finite, with gradients reaching
the right parameters; checkpoint and resume bit for bit; the bad inputs refused in one line before any
work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_kernels.trainer import checkpoint as ckpt
from rlhf_kernels.trainer import hf
from rlhf_kernels.trainer.cli import main
from rlhf_kernels.trainer.config import ConfigError, make_config
from rlhf_kernels.trainer.model import IGNORE_INDEX, PolicyValueModel, generate
from rlhf_kernels.trainer.pipeline import train
from rlhf_kernels.trainer.runtime import Runtime, full_state, load_full_state
from rlhf_kernels.trainer.sft import make_optimizer, optimizer_step

# transformers (the optional extra; the suite's venv has it) is imported by the tests that need it, not
# here: the FSDP test's worker processes import this module without it.
transformers = tokenizers = None


def _import_transformers() -> None:
    global transformers, tokenizers
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")


WORDS = [f"w{i}" for i in range(92)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CONTEXT = 40
REWARD = "test_trainer_hf:reward_fn"


def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
    """The test's reward: how often a response says ``w7``, less a little per word."""
    assert len(prompts) == len(responses) and all(isinstance(p, str) and p for p in prompts)
    return [r.split().count("w7") - 0.1 * len(r.split()) for r in responses]


def _tokenizer(kind: str):
    """Llama: a word-level tokenizer with a pad token.  Qwen2 (transformers loads a Qwen2 folder's
    tokenizer as its byte-level BPE class): single characters, no merges, and no pad token."""
    if kind == "qwen2":
        chars = ["Ġ", "w"] + [str(d) for d in range(10)]
        vocab = SPECIALS + chars + [f"x{i}" for i in range(len(WORDS) - len(chars))]
        return transformers.Qwen2Tokenizer(
            vocab={t: i for i, t in enumerate(vocab)},
            merges=[],
            eos_token="</s>",
            pad_token=None,
            unk_token="<unk>",
            bos_token=None,
        )
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _save_model(folder: Path, kind: str) -> str:
    size = dict(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(**size, pad_token_id=0)
    else:  # Qwen2: tied embeddings, q/k/v biases; its tokenizer here has no pad token
        config = transformers.Qwen2Config(**size, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    _tokenizer(kind).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    _import_transformers()
    root = tmp_path_factory.mktemp("hf")
    prompts = root / "prompts.jsonl"
    lines = [{"prompt": " ".join(WORDS[(3 * i + j) % 40] for j in range(2 + i % 5))} for i in range(12)]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return {
        "llama": _save_model(root / "llama", "llama"),
        "qwen2": _save_model(root / "qwen2", "qwen2"),
        "prompts": str(prompts),
        "root": root,
    }


def _config(models, out, kind="llama", **overrides):
    values = dict(
        model=models[kind],
        prompts=models["prompts"],
        reward=REWARD,
        out_dir=str(out),
        device="cpu",
        progress=False,
        plot=False,
        ppo_steps=1,
        rollout_batch=8,
        minibatch=4,
        ppo_epochs=1,
        group_size=2,
        eval_prompts=4,
        max_new_tokens=5,
        ckpt_every=1,
    )
    return make_config("micro", **{**values, **overrides})


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_adapter_reads_the_models_own_distribution(models, tmp_path, kind):
    """Log-probs (fused lm_head and plain) and entropy of left-padded rows equal log_softmax of the
    causal LM's own logits of each row alone; packing changes nothing; the value head reads the same
    hidden states (zero at start)."""
    setup = hf.HFSetup(_config(models, tmp_path, kind))
    policy, lm = setup.policy, setup.causal_lm
    assert policy.eos_id == 2 and policy.pad_id == (0 if kind == "llama" else 2)
    assert (policy.lm_head.weight is lm.model.embed_tokens.weight) == (kind == "qwen2")
    ids = torch.tensor([[0, 0, 5, 9, 11, 30, 31], [4, 6, 8, 10, 12, 40, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    labels = ids[:, -3:].clone()
    labels[0, -1] = IGNORE_INDEX
    results = []
    for fused, pack in ((True, False), (False, False), (True, True)):
        policy.cfg.fused_lm_head, policy.backbone.pack = fused, pack
        out = policy(ids, mask, labels, return_entropy=True, return_values=True)
        results.append(out)
        for row in range(2):
            real = mask[row]
            logits = lm(input_ids=ids[row, real][None]).logits[0].double()
            logp = logits.log_softmax(-1)[-4:-1]
            want = logp.gather(-1, ids[row, -3:, None]).squeeze(-1)
            keep = labels[row] != IGNORE_INDEX
            torch.testing.assert_close(out.logprobs[row][keep].double(), want[keep], rtol=1e-5, atol=1e-5)
            assert out.logprobs[row][~keep].eq(0).all()
            entropy = -(logp.exp() * logp).sum(-1)
            torch.testing.assert_close(out.entropy[row][keep].double(), entropy[keep], rtol=1e-5, atol=1e-5)
    assert results[0].values.shape == ids.shape and results[0].values.eq(0).all()
    torch.testing.assert_close(results[2].logprobs, results[0].logprobs, rtol=1e-5, atol=1e-6)
    # gradients reach the backbone, the lm_head and the value head through the library's ops
    policy.cfg.fused_lm_head, policy.backbone.pack = True, True
    out = policy(ids, mask, labels, return_values=True)
    (out.logprobs.sum() + out.values[mask].sum()).backward()
    for name, p in (
        ("value_head", policy.value_head.weight),
        ("lm_head", policy.lm_head.weight),
        ("first layer", next(policy.backbone.base.layers[0].parameters())),
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cached_generation_equals_recomputation(models, tmp_path):
    setup = hf.HFSetup(_config(models, tmp_path))
    prompts = setup.task.sample_prompts(6, torch.Generator().manual_seed(1))
    runs = [
        generate(
            setup.policy,
            prompts.ids,
            prompts.mask,
            max_new_tokens=6,
            temperature=temperature,
            generator=torch.Generator().manual_seed(2),
            use_cache=use_cache,
        )
        for temperature in (0.0, 1.0)
        for use_cache in (True, False)
    ]
    for cached, recomputed in (runs[:2], runs[2:]):
        assert torch.equal(cached[0], recomputed[0]) and torch.equal(cached[1], recomputed[1])
    responses, mask = runs[2]
    assert responses[~mask].eq(setup.pad_id).all()
    ended = (responses == setup.eos_id) & mask
    assert (ended.cumsum(1) * mask <= 1).all()  # nothing kept after an EOS


# --------------------------------------------------------------------------------------------------
# One step of each algorithm; checkpoint and resume
# --------------------------------------------------------------------------------------------------
def _policy_state(out_dir) -> dict:
    return ckpt.load(Path(out_dir) / "checkpoints" / "ppo.pt")["policy"]


def _changed(state: dict, initial: dict) -> dict[str, bool]:
    return {name: not torch.equal(state[name], initial[name]) for name in initial}


@pytest.mark.parametrize(
    "kind, algo",
    [
        ("llama", "ppo"),
        ("qwen2", "ppo"),
        ("llama", "grpo"),
        ("llama", "rloo"),
        ("llama", "remax"),
        ("llama", "reinforce_plus_plus"),
        ("llama", "reinforce"),
    ],
)
def test_one_step_of_each_algorithm(models, tmp_path, kind, algo):
    cfg = _config(models, tmp_path, kind, algo=algo, pack=kind == "llama")
    summary = train(cfg)
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["stage"] == "ppo" and record["step"] == 0
    assert torch.isfinite(torch.tensor(record["loss"])) and record["grad_norm"] > 0, record
    for key in ("start_reward", "final_reward", "final_kl", "tokens_per_s"):
        assert torch.isfinite(torch.tensor(summary[key])), (key, summary[key])
    assert summary["model_class"] == ("LlamaForCausalLM" if kind == "llama" else "Qwen2ForCausalLM")
    assert summary["pad_token"].startswith("none in the tokenizer" if kind == "qwen2" else "the tokenizer's")
    initial = hf.HFSetup(cfg).policy.state_dict()
    changed = _changed(_policy_state(tmp_path), initial)
    assert changed["lm_head.weight"] and any(v for k, v in changed.items() if ".layers.0." in k)
    # the value head learns with PPO only (the critic-free algorithms leave it untouched)
    assert changed["value_head.weight"] == (algo == "ppo")


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run(models, tmp_path):
    full = train(_config(models, tmp_path / "full", ppo_steps=2))
    with pytest.raises(SystemExit, match="halted after PPO step 0"):
        train(_config(models, tmp_path / "cut", ppo_steps=2, halt_after_step=0))
    resumed = train(_config(models, tmp_path / "cut", ppo_steps=2, resume=True))
    assert resumed["resumed_from"] == "ppo"
    assert resumed["final_reward"] == full["final_reward"] and resumed["final_kl"] == full["final_kl"]
    cut, whole = _policy_state(tmp_path / "cut"), _policy_state(tmp_path / "full")
    assert all(torch.equal(cut[name], whole[name]) for name in whole)


# --------------------------------------------------------------------------------------------------
# Bad input: one line each, before any work
# --------------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_inputs_are_refused_in_one_line_before_any_work(models, tmp_path, capsys):
    root = models["root"]
    not_causal = root / "vit"
    if not not_causal.exists():
        transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ).save_pretrained(not_causal)
    no_eos = root / "no_eos"
    if not no_eos.exists():  # the Llama model, with a tokenizer that has no EOS token
        shutil.copytree(models["llama"], no_eos)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (no_eos / name).unlink(missing_ok=True)
        vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
        bare = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
        transformers.PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="<unk>").save_pretrained(no_eos)
    long_prompt = _write(tmp_path / "long.jsonl", json.dumps({"prompt": " ".join(WORDS[:CONTEXT])}) + "\n")
    cases = [
        (dict(model=str(not_causal)), "is not a causal language model"),
        (dict(model=str(tmp_path)), "not a Hugging Face model folder"),
        (dict(model=str(no_eos)), "the tokenizer has no EOS token"),
        (dict(prompts=long_prompt), "> the model's context of 40"),
        (
            dict(prompts=_write(tmp_path / "bad.jsonl", '{"prompt": "w1"}\n{"text": "w2"}\n')),
            r'bad.jsonl:2: expected an object with a non-empty string "prompt"',
        ),
        (dict(prompts=_write(tmp_path / "nojson.jsonl", "w1 w2\n")), "nojson.jsonl:1: not JSON"),
        (dict(prompts=str(tmp_path / "missing.jsonl")), "missing.jsonl: cannot be read"),
        (dict(reward="no_such_module_here:f"), "module 'no_such_module_here' does not import"),
        (dict(reward="test_trainer_hf:no_such_function"), "has no function 'no_such_function'"),
        (dict(reward="just_a_name"), "--reward must be module:function or a reward model folder"),
        (dict(reward=""), "--reward is required with --model"),
        (dict(algo="dpo"), "--algo dpo needs the embedded task's demonstrations or preference data"),
        (dict(top_k=500), r"--top_k must be in \[0, 96\] \(the model's vocabulary\)"),
    ]
    for overrides, message in cases:
        out = tmp_path / "out"
        with pytest.raises(ConfigError, match=message) as exc:
            train(_config(models, out, **overrides))
        assert len(exc.value.problems) == 1 and "\n" not in exc.value.problems[0], exc.value.problems
        assert not out.exists(), overrides  # nothing written
    with pytest.raises(ConfigError, match="--prompts, --reward and --pack apply to --model"):
        make_config("micro", prompts=models["prompts"])
    # the command line: one line, exit status 2
    argv = [
        "--preset",
        "micro",
        "--model",
        models["llama"],
        "--prompts",
        long_prompt,
        "--reward",
        REWARD,
        "--out_dir",
        str(tmp_path / "cli"),
    ]
    assert main(argv, prog="trainer") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("trainer: error: --prompts"), errors


def test_python_reward_with_the_wrong_length_is_named(models, tmp_path):
    setup = hf.HFSetup(_config(models, tmp_path))
    reward = hf.HFReward("m:f", setup.tokenizer, setup.task.prompt_len, lambda p, r: [1.0], None)
    prompts = setup.task.sample_prompts(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"--reward m:f: returned 1 scores for 3 responses"):
        reward(prompts.ids, prompts.mask, None)


def test_reward_model_folder_scores_the_last_real_token(models, tmp_path):
    """--reward PATH: a sequence-classification model with one label scores each row at its last real
    token, as the model's own pooling does; a model with two labels is refused."""
    config = transformers.LlamaConfig.from_pretrained(models["llama"])
    torch.manual_seed(3)
    for labels, folder in ((1, tmp_path / "rm"), (2, tmp_path / "rm2")):
        config.num_labels = labels
        transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    cfg = _config(models, tmp_path / "out", reward=str(tmp_path / "rm"))
    setup = hf.HFSetup(cfg)
    rm = setup.reward.model
    prompts = setup.task.sample_prompts(4, torch.Generator().manual_seed(0))
    responses, response_mask = generate(
        setup.policy,
        prompts.ids,
        prompts.mask,
        max_new_tokens=4,
        temperature=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    response_mask[0, 2:] = response_mask[1, 1:] = False  # responses of 2 and 1 tokens, right-padded
    responses[~response_mask] = setup.pad_id
    ids, mask = torch.cat([prompts.ids, responses], 1), torch.cat([prompts.mask, response_mask], 1)
    got = setup.reward(ids, mask, None)
    for row in range(4):  # the row alone, unpadded: the model's own pooled score
        alone = rm(input_ids=ids[row, mask[row]][None]).logits[0, 0]
        torch.testing.assert_close(got[row], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="needs one label and a score head"):
        hf.HFSetup(_config(models, tmp_path / "out", reward=str(tmp_path / "rm2")))


# --------------------------------------------------------------------------------------------------
# Sharded data parallelism (--fsdp, FSDP2): 2 CPU processes on gloo against one unsharded replica
# --------------------------------------------------------------------------------------------------
def _fsdp_loss(model, ids, mask, labels):
    out = model(ids, mask, labels, return_entropy=True, return_values=True)
    return -out.logprobs.mean() + out.values.square().mean() - 0.1 * out.entropy.mean()


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    import copy
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        cfg = make_config("micro", device="cpu")
        cfg.fsdp = True  # (the config refuses --fsdp without --model; the sharding itself is generic)
        rt = Runtime(cfg=cfg, device=torch.device("cpu"), rank=rank, world=world)
        torch.manual_seed(0)  # the same model and data on every rank
        replica = PolicyValueModel(cfg)
        torch.nn.init.normal_(replica.value_head.weight, std=0.1)
        policy = rt.wrap(copy.deepcopy(replica))
        assert type(policy.lm_head.weight).__name__ == "DTensor"
        assert policy.lm_head.weight.to_local().shape[0] < cfg.vocab_size  # this rank's shard only
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(4, cfg.vocab_size, (4, 9), generator=gen)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[0, :3] = False
        labels = ids[:, -4:]
        optimizers = make_optimizer(policy, 1e-2), make_optimizer(replica, 1e-2)
        for _ in range(2):
            rows = slice(2 * rank, 2 * rank + 2)  # each rank its half; gradients are averaged
            optimizer_step(
                optimizers[0], policy, _fsdp_loss(policy, ids[rows], mask[rows], labels[rows]), 1.0
            )
            whole = (
                sum(
                    _fsdp_loss(
                        replica, ids[2 * r : 2 * r + 2], mask[2 * r : 2 * r + 2], labels[2 * r : 2 * r + 2]
                    )
                    for r in range(world)
                )
                / world
            )
            optimizer_step(optimizers[1], replica, whole, 1.0)
        model_state, optim_state = full_state(policy, optimizers[0])  # collective
        if rank == 0:
            want = replica.state_dict()
            assert set(model_state) == set(want)
            for name in want:
                torch.testing.assert_close(model_state[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
            assert optim_state["state"], "the optimizer state is gathered too"
        # generation gathers the root's parameters; greedy samples equal the replica's
        got = generate(policy, ids[:, :5], mask[:, :5], max_new_tokens=3, temperature=0.0)
        expected = generate(replica, ids[:, :5], mask[:, :5], max_new_tokens=3, temperature=0.0)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        # a full state loads back into the sharded model (resume)
        fresh = PolicyValueModel(cfg)
        load_full_state(policy, fresh.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(
                _fsdp_loss(policy, ids, mask, labels), _fsdp_loss(fresh, ids, mask, labels)
            )
    finally:
        dist.destroy_process_group()


def test_fsdp_two_processes_equal_one_unsharded_replica(monkeypatch):
    import os
    import socket
    import time

    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(_fsdp_worker, args=(2, port), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail("FSDP workers did not finish within 240 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, 9)
