"""Benchmark figure (not a test): one TRL 1.16 GRPOTrainer step of a small random Qwen2 model with a 32k
vocabulary on the CPU, with and without ``rlhf_kernels.compat.trl.patch()``: wall time of the step and
the rise of the process's peak resident memory during it.  Each variant runs in a fresh process.

    .venv/bin/python tests/peers/measure_trl_step.py [--vocab 32000] [--completion 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _one_step(patched: bool, vocab: int, completion: int) -> dict:
    import resource
    import time

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_kernels.compat import trl as ct

    torch.set_num_threads(1)
    directory = Path(tempfile.mkdtemp())
    words = {f"w{i}": i + 3 for i in range(vocab - 3)} | {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    if patched:
        ct.patch()
    args = GRPOConfig(
        output_dir=str(directory / "out"),
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=completion,
        max_steps=1,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        beta=0.04,
        disable_tqdm=True,
        logging_steps=1,
    )
    dataset = Dataset.from_dict({"prompt": ["w5 w6 w7 w8"] * 8})
    trainer = GRPOTrainer(
        model=str(directory),
        reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak_rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {
        "patched": patched,
        "step_s": round(seconds, 3),
        "peak_rss_rise_mib": round(peak_rise / 1024, 1),
        "loss": trainer.state.log_history[0]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["plain", "patched"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one_step(args.child == "patched", args.vocab, args.completion)))
        return
    for _ in range(args.repeats):
        for variant in ("plain", "patched"):
            output = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    "--vocab",
                    str(args.vocab),
                    "--completion",
                    str(args.completion),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            print(output.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
