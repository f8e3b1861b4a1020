"""Fine-tuning a pretrained causal LM on a shifted task: full fine-tune vs memory adapter vs LoRA vs both.

    python scripts/adapter_compare.py                                   # rlmem/conf/adapter_compare.yaml
    python scripts/adapter_compare.py smoke=true hydra.run.dir=/tmp/ac  # a quick check that it all runs

1. A tiny causal LM (``base.arch``: llama or gpt2) is pretrained on ``pretrain_task`` with next-token loss
   (:func:`rlmem.causal_lm.pretrain_causal_lm`) and saved with ``save_pretrained`` into
   ``<run dir>/base_model``, or ``base.source`` names a directory saved earlier (e.g. by
   ``scripts/pretrain_lm.py``) and pretraining is skipped.
2. Every method starts from a fresh load of that directory and is trained on ``finetune_task`` with the same
   step budget, batch size, warm-up and data seed (only the learning rate is per method):
   ``vanilla`` (every weight trained), ``memory`` (memory adapters, base frozen), ``lora`` (LoRA only),
   ``memory_lora`` (both).
3. Each is evaluated on the same held-out batches of ``finetune_task``: answer accuracy, answer perplexity
   (exp of the cross-entropy at answer positions), next-token perplexity (every position), trainable
   parameters and training tokens/s. Methods with a memory bank are evaluated again after int8
   quantization of the bank.

Writes ``results.csv`` (one row per method and seed), ``results.md`` (the table) and ``base_model/`` into the
run dir.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlmem.adapters import inject_memory, quantize_memory
from rlmem.causal_lm import lm_labels, load_causal_lm, pretrain_causal_lm, tiny_causal_lm
from rlmem.commands.lm_grid import mean_std
from rlmem.lm_tasks.tasks import IGNORE_INDEX, LMBatch, LMTask, build_task

log = logging.getLogger("adapter_compare")

METHODS = ("vanilla", "memory", "lora", "memory_lora")


def held_out(task: LMTask, batch_size: int, batches: int, seed: int) -> list[LMBatch]:
    """The evaluation batches (the same draw :func:`pretrain_causal_lm` evaluates on for these arguments)."""
    rng = np.random.default_rng(seed)
    return [task.batch(batch_size, rng) for _ in range(batches)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[LMBatch]) -> dict[str, float]:
    """``accuracy`` (answers), ``answer_ppl`` (exp CE at answer positions), ``token_ppl`` (exp next-token CE)."""
    model.eval()
    right = answers = 0
    answer_ce = token_ce = tokens = 0.0
    for batch in batches:
        logits = model(input_ids=batch.inputs, use_cache=False).logits  # [B, T, V]
        labels = lm_labels(batch)
        token_ce += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                          reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
        at = logits[batch.mask]
        answer_ce += float(F.cross_entropy(at, batch.targets[batch.mask], reduction="sum"))
        right += int((at.argmax(-1) == batch.targets[batch.mask]).sum())
        answers += int(batch.mask.sum())
    return {"accuracy": right / answers, "answer_ppl": math.exp(answer_ce / answers),
            "token_ppl": math.exp(token_ce / tokens)}


def pretrained_base(c: Mapping[str, Any], out_dir: Path, vocab_size: int, max_positions: int) -> tuple[Path, dict]:
    """The base model's directory: ``base.source`` if given, else a tiny LM pretrained here."""
    b = c["base"]
    if b["source"]:
        path = Path(b["source"]).expanduser()
        model = load_causal_lm(path)  # clear errors for a missing directory / not a causal LM
        if model.config.vocab_size < vocab_size:
            raise SystemExit(f"adapter_compare: the base model's vocabulary ({model.config.vocab_size}) is smaller "
                             f"than the tasks' ({vocab_size})")
        return path, {}
    task = build_task(**c["pretrain_task"])
    model = tiny_causal_lm(b["arch"], vocab_size=vocab_size, hidden_size=b["hidden_size"], n_layers=b["n_layers"],
                           n_heads=b["n_heads"], max_positions=max_positions, seed=b["seed"])
    p = c["pretrain"]
    log.info("pretraining a tiny %s on %s for %d steps", b["arch"], task, p["steps"])
    result = pretrain_causal_lm(model, task, p["steps"], batch_size=p["batch_size"], lr=p["lr"],
                                warmup_steps=p["warmup_steps"], seed=b["seed"], eval_batches=c["eval_batches"])
    log.info("pretrained: answer accuracy %.3f on %s (%.0f s)", result["eval_answer_accuracy"], task.name,
             result["wall_seconds"])
    path = out_dir / "base_model"
    model.save_pretrained(path)
    return path, result


def finetune(method: str, spec: Mapping[str, Any], base_dir: Path, task: LMTask, c: Mapping[str, Any], seed: int,
             evals: Sequence[LMBatch]) -> dict[str, Any]:
    """Fine-tune one method from a fresh load of the base; evaluate (and again with an int8 bank)."""
    model = load_causal_lm(base_dir)
    torch.manual_seed(seed)  # the adapter's initialization
    if method != "vanilla":
        model = inject_memory(model, dict(spec["adapter"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    f = c["finetune"]
    result = pretrain_causal_lm(model, task, f["steps"], batch_size=f["batch_size"], lr=spec["lr"],
                                warmup_steps=f["warmup_steps"], seed=seed, eval_seed=c["eval_seed"],
                                eval_batches=c["eval_batches"])
    row = {"method": method, "seed": seed, "trainable_params": trainable, "lr": spec["lr"], "steps": f["steps"],
           "tokens_per_s": result["tokens_per_s"], "wall_seconds": result["wall_seconds"], **evaluate(model, evals)}
    if method != "vanilla" and getattr(model, "adapter", None) is not None:
        sizes = quantize_memory(model)
        int8 = evaluate(model, evals)
        row.update({f"int8_{k}": v for k, v in int8.items()})
        row.update(bank_bytes=sizes["bytes_before"], int8_bank_bytes=sizes["bytes_after"])
    log.info("%s seed %d: accuracy %.3f, answer ppl %.3f, %d trainable parameters, %.0f tokens/s", method, seed,
             row["accuracy"], row["answer_ppl"], trainable, row["tokens_per_s"])
    return row


def _cell(rows: Sequence[Mapping[str, Any]], key: str, fmt: str) -> str:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if len(values) > 1 else "")


def results_markdown(rows: Sequence[Mapping[str, Any]], before: Mapping[str, float], c: Mapping[str, Any],
                     pretrain: Mapping[str, Any], wall: float) -> str:
    seeds = sorted({r["seed"] for r in rows})
    f, p = c["finetune"], c["pretrain"]
    pre = build_task(**c["pretrain_task"])
    fine = build_task(**c["finetune_task"])
    base = (f"a tiny {c['base']['arch']} ({c['base']['n_layers']} layers, hidden {c['base']['hidden_size']}) pretrained "
            f"for {p['steps']} steps of batch {p['batch_size']} on `{pre!r}` (answer accuracy there "
            f"{pretrain['eval_answer_accuracy']:.3f})") if pretrain else f"`{c['base']['source']}`"
    lines = [
        "# Memory adapters vs LoRA vs full fine-tuning",
        "",
        f"Base: {base}. Fine-tuned on `{fine!r}` for {f['steps']} steps of batch {f['batch_size']} "
        f"(warm-up {f['warmup_steps']}, cosine), seeds {', '.join(map(str, seeds))}; evaluated on "
        f"{c['eval_batches']} held-out batches. Chance accuracy {fine.chance_accuracy():.3f}. {wall / 60:.1f} min wall.",
        "",
        "| method | lr | trainable params | accuracy | answer ppl | token ppl | train tokens/s | int8 bank: accuracy "
        "| int8 bank: answer ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| pretrained base, not fine-tuned | - | 0 | {before['accuracy']:.3f} | {before['answer_ppl']:.3f} | "
        f"{before['token_ppl']:.3f} | - | - | - |",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        lines.append(
            f"| {method} | {rs[0]['lr']:g} | {int(rs[0]['trainable_params']):,} | {_cell(rs, 'accuracy', '.3f')} | "
            f"{_cell(rs, 'answer_ppl', '.3f')} | {_cell(rs, 'token_ppl', '.3f')} | {_cell(rs, 'tokens_per_s', ',.0f')} | "
            f"{_cell(rs, 'int8_accuracy', '.3f')} | {_cell(rs, 'int8_answer_ppl', '.3f')} |")
    quantized = [r for r in rows if r.get("int8_accuracy") not in (None, "")]
    if quantized:
        delta = [float(r["int8_accuracy"]) - float(r["accuracy"]) for r in quantized]
        r0 = quantized[0]
        lines += ["", f"int8 bank (per-row scales): {int(r0['bank_bytes']):,} -> {int(r0['int8_bank_bytes']):,} bytes "
                      f"per model; accuracy change over {len(delta)} quantized runs: mean {np.mean(delta):+.4f}, "
                      f"largest {max(delta, key=abs):+.4f}."]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="pkg://rlmem.conf", config_name="adapter_compare")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_container(cfg, resolve=True)
    if c["smoke"]:
        for key, values in c["smoke_overrides"].items():
            c[key] = values if not isinstance(values, dict) else {**c[key], **values}
    torch.set_num_threads(int(c["threads"]))
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per method is noise in the log
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    unknown = sorted(set(c["methods"]) - set(METHODS))
    if unknown:
        raise SystemExit(f"adapter_compare: unknown methods {unknown}; valid: {list(METHODS)}")
    try:
        pre_task, fine_task = build_task(**c["pretrain_task"]), build_task(**c["finetune_task"])
    except ValueError as err:
        raise SystemExit(f"adapter_compare: invalid task: {err}") from None
    vocab = max(pre_task.vocab_size, fine_task.vocab_size)
    t0 = time.perf_counter()
    base_dir, pretrain = pretrained_base(c, out_dir, vocab, max(pre_task.seq_len, fine_task.seq_len))
    evals = held_out(fine_task, c["finetune"]["batch_size"], c["eval_batches"], c["eval_seed"])
    before = evaluate(load_causal_lm(base_dir), evals)
    rows = [finetune(m, spec, base_dir, fine_task, c, seed, evals)
            for seed in c["seeds"] for m, spec in c["methods"].items()]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    md = results_markdown(rows, before, c, pretrain, time.perf_counter() - t0)
    (out_dir / "results.md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
