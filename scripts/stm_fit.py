"""STM content optimization (Phase 1a): does one set of K content embeddings serve two modes?

    python scripts/stm_fit.py                                      # K in 4, 8, 16, 32 (rlmem/conf/stm_fit.yaml)
    python scripts/stm_fit.py generator=/path/to/lm num_examples=64 # a local save_pretrained causal LM
    python scripts/stm_fit.py smoke=true hydra.run.dir=/tmp/fit    # a quick check that everything runs

For each example (a story, its question Q and answer A, from an LM task with text-like samples: bAbI-style
stories by default), K content embeddings ``c`` are optimized with Adam so that a frozen causal LM (the
generator) reading ``[Q_mode | c]`` as input embeddings emits Q's tokens and reading ``[A_mode | c]`` emits A's
tokens (teacher-forced cross-entropy, mean over the target's tokens). ``Q_mode`` and ``A_mode`` are two fixed
random embeddings (seeded, scaled like the generator's token embeddings): the content must be addressable by
the mode alone. Stages, for every K:

1. single target: Q only, then A only (is each target reachable through K soft tokens at all?);
2. joint: one content for both, loss ``loss_Q + loss_A``;
3. spot validation: greedy decoding from ``[Q_mode | c]`` and ``[A_mode | c]`` with the joint content, compared
   with Q and A token by token.

Each stage runs up to ``num_restarts`` restarts of ``num_steps`` Adam steps (``lr``, 1.0 by default) from
fresh random contents, restarting only the examples not converged yet and keeping each example's best
content. A target is **converged** when its loss is below ``converge_random`` (0.3) x the random-content
baseline (the same prompt with random content, averaged over ``random_baselines`` draws) or below
``converge_full`` (2) x the full-context loss (the generator reading the real story: Q's tokens after the
story, A after the story and Q). The joint stage converges when both targets do.

All examples of a stage are optimized together as one batch: the loss is the *sum* of per-example losses
and Adam is elementwise, so every example follows exactly the trajectory it would alone.

The generator: ``generator=null`` pretrains a tiny causal LM on the task (next-token prediction,
:func:`rlmem.causal_lm.pretrain_causal_lm`) inside the run and saves it to ``<run dir>/generator`` (a rerun
of the same run dir reuses it); ``generator=<dir>`` loads a local ``save_pretrained`` directory (never
downloads), e.g. one written by ``scripts/pretrain_lm.py``.

Outputs in the run dir: ``examples/K<K>/ex<i>.json`` (story, Q and A text, every stage's losses and converged
flag, the baselines and thresholds, decoded text), ``contents_K<K>.pt`` (the best contents of each stage, ``[N, K, hidden]``, and the mode
embeddings), ``summary.json`` and ``summary.md`` (convergence rates and decode accuracy vs K).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from rlmem.causal_lm import freeze, load_causal_lm, pretrain_causal_lm, tiny_causal_lm
from rlmem.validate import check_float, check_int
from rlmem.lm_tasks.tasks import LMTask, build_task

log = logging.getLogger("stm_fit")

STAGES = ("q", "a", "joint")


# -- examples ----------------------------------------------------------------------------------------------

def make_examples(task: LMTask, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` examples of ``task``: ``story: [n, T]`` (the whole input, question included), ``q: [n, Lq]`` (the
    question: the last ``Lq`` input tokens), ``a: [n, 1]`` (the answer). Q is everything after the last
    fact/filler period, so a task must end its input with a question."""
    batch = task.batch(n, np.random.default_rng(seed))
    story, answer = batch.inputs, batch.targets[:, -1:]
    if not bool(batch.mask[:, -1].all()) or int(batch.mask.sum()) != n:
        raise ValueError(f"task {task.name!r}: stm_fit needs one answer per sample, at its last position")
    q_len = getattr(task, "QUESTION_LEN", {}).get(getattr(task, "hops", None))
    if q_len is None:
        raise ValueError(f"task {task.name!r} has no fixed question length; stm_fit supports: babi")
    return {"story": story, "q": story[:, -q_len:], "a": answer}


def decode_text(task: LMTask, tokens: torch.Tensor) -> str:
    decode = getattr(task, "decode", None)
    return decode(tokens.tolist()) if decode else " ".join(map(str, tokens.tolist()))


# -- the generator -----------------------------------------------------------------------------------------

def get_generator(cfg: dict, task: LMTask, out_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen generator and how it was obtained (``source``, and the pretraining metrics if any)."""
    source = cfg["generator"]
    if source is None:
        saved = out_dir / "generator"
        if saved.is_dir():
            log.info("reusing the generator pretrained earlier in this run dir: %s", saved)
            model, info = load_causal_lm(saved), {"source": str(saved), "pretrained_in_run": True, "reused": True}
        else:
            p = cfg["pretrain"]
            model = tiny_causal_lm(p["arch"], vocab_size=task.vocab_size, hidden_size=int(p["hidden_size"]),
                                   n_layers=int(p["n_layers"]), n_heads=int(p["n_heads"]), seed=int(cfg["seed"]))
            log.info("pretraining a tiny %s (hidden %d, %d layers) on %s for %d steps", p["arch"], p["hidden_size"],
                     p["n_layers"], task.name, p["steps"])
            metrics = pretrain_causal_lm(model, task, int(p["steps"]), batch_size=int(p["batch_size"]),
                                         lr=float(p["lr"]), seed=int(cfg["seed"]), progress=bool(cfg["progress_bar"]))
            model.save_pretrained(saved)
            log.info("generator: eval loss %.3f, answer accuracy %.3f (chance %.3f), %.0f s; saved to %s",
                     metrics["eval_loss"], metrics["eval_answer_accuracy"], metrics["chance_accuracy"],
                     metrics["wall_seconds"], saved)
            info = {"source": str(saved), "pretrained_in_run": True, "reused": False, "pretrain": metrics}
    else:
        model = load_causal_lm(source)  # FileNotFoundError / ValueError naming the valid choices
        info = {"source": str(source), "pretrained_in_run": False}
    if model.config.vocab_size < task.vocab_size:
        raise ValueError(f"generator {info['source']}: its vocabulary ({model.config.vocab_size} tokens) does not "
                         f"cover task {task.name!r} ({task.vocab_size} tokens)")
    return freeze(model), info


# -- losses --------------------------------------------------------------------------------------------------

def target_loss(model: nn.Module, prefix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy of ``target: [N, L]`` after the soft prompt ``prefix: [N, P, H]``, mean
    over the L tokens: ``[N]``."""
    P = prefix.shape[1]
    x = torch.cat([prefix, model.get_input_embeddings()(target[:, :-1])], 1)
    logits = model(inputs_embeds=x, use_cache=False).logits[:, P - 1:]  # position P-1+j predicts target[:, j]
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


@torch.no_grad()
def full_context_losses(model: nn.Module, ex: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generator reading the real story: Q's tokens after the story, A after the story and Q. ``[N]`` each."""
    ids = torch.cat([ex["story"], ex["a"]], 1)
    logits = model(input_ids=ids, use_cache=False).logits
    T, Lq = ex["story"].shape[1], ex["q"].shape[1]
    q = F.cross_entropy(logits[:, T - Lq - 1:T - 1].transpose(1, 2), ex["q"], reduction="none").mean(1)
    a = F.cross_entropy(logits[:, T - 1], ex["a"][:, 0], reduction="none")
    return {"q": q, "a": a}


def prompt(mode: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """``[mode | content]``: ``mode: [H]``, ``content: [N, K, H]`` -> ``[N, K + 1, H]``."""
    return torch.cat([mode.expand(content.shape[0], 1, -1), content], 1)


def stage_loss(model, stage: str, modes: dict, content: torch.Tensor, ex: dict) -> dict[str, torch.Tensor]:
    """Per-example losses ``[N]`` of the targets a stage optimizes (``q``, ``a`` or both)."""
    targets = ("q", "a") if stage == "joint" else (stage,)
    return {t: target_loss(model, prompt(modes[t], content), ex[t]) for t in targets}


@torch.no_grad()
def random_baselines(model, modes, ex, K: int, scale: float, draws: int, gen: torch.Generator) -> dict:
    """Loss of each target with random content (``randn * scale``), averaged over ``draws``: ``[N]`` each."""
    N, H = ex["q"].shape[0], modes["q"].shape[0]
    out = {"q": torch.zeros(N), "a": torch.zeros(N)}
    for _ in range(draws):
        content = torch.randn(N, K, H, generator=gen) * scale
        for t in ("q", "a"):
            out[t] += target_loss(model, prompt(modes[t], content), ex[t]) / draws
    return out


@torch.no_grad()
def greedy_decode(model: nn.Module, prefix: torch.Tensor, length: int) -> torch.Tensor:
    """Greedy continuation of the soft prompt ``prefix: [N, P, H]``: ``[N, length]`` token ids."""
    x, out = prefix, []
    for _ in range(length):
        token = model(inputs_embeds=x, use_cache=False).logits[:, -1].argmax(-1)
        out.append(token)
        x = torch.cat([x, model.get_input_embeddings()(token).unsqueeze(1)], 1)
    return torch.stack(out, 1)


# -- optimization ---------------------------------------------------------------------------------------------

def optimize_stage(model, stage: str, modes: dict, ex: dict, K: int, thresholds: dict, cfg: dict, scale: float,
                   gen: torch.Generator, bar) -> dict[str, Any]:
    """Restarts of ``num_steps`` Adam steps on the examples not converged yet; keeps each example's best
    content (lowest stage loss). Returns ``content: [N, K, H]``, per-target ``loss: [N]``, ``converged: [N]``
    (bool), ``restarts_used: [N]`` and per-restart final losses."""
    N, H = ex["q"].shape[0], modes["q"].shape[0]
    targets = ("q", "a") if stage == "joint" else (stage,)
    best = torch.zeros(N, K, H)
    best_loss = {t: torch.full((N,), float("inf")) for t in targets}
    best_total = torch.full((N,), float("inf"))
    converged = torch.zeros(N, dtype=torch.bool)
    restarts_used = torch.zeros(N, dtype=torch.long)
    history: list[list[float]] = [[] for _ in range(N)]
    for restart in range(int(cfg["num_restarts"])):
        rows = (~converged).nonzero().squeeze(1)
        if rows.numel() == 0:
            bar.update(int(cfg["num_steps"]) * (int(cfg["num_restarts"]) - restart))
            break
        sub = {k: v[rows] for k, v in ex.items()}
        content = (torch.randn(rows.numel(), K, H, generator=gen) * scale).requires_grad_(True)
        optimizer = torch.optim.Adam([content], lr=float(cfg["lr"]))
        for _ in range(int(cfg["num_steps"])):
            losses = stage_loss(model, stage, modes, content, sub)
            total = sum(losses.values())  # [n]; summed over examples: each follows its own trajectory
            optimizer.zero_grad(set_to_none=True)
            total.sum().backward()
            optimizer.step()
            bar.update(1)
        with torch.no_grad():
            losses = stage_loss(model, stage, modes, content, sub)
        total = sum(losses.values())
        ok = torch.ones(rows.numel(), dtype=torch.bool)
        for t in targets:
            ok &= (losses[t] < thresholds[t][rows])
        for j, i in enumerate(rows.tolist()):
            history[i].append(float(total[j]))
            restarts_used[i] = restart + 1
            if ok[j] or total[j] < best_total[i]:
                best_total[i] = total[j]
                best[i] = content[j].detach()
                for t in targets:
                    best_loss[t][i] = losses[t][j]
            converged[i] |= bool(ok[j])
    return {"content": best, "loss": best_loss, "converged": converged, "restarts_used": restarts_used,
            "history": history}


def run_k(model, task, ex, modes, K: int, full: dict, cfg: dict, scale: float, gen, bar, out_dir: Path) -> dict:
    """Every stage for one K; writes the per-example JSON and the contents; returns per-example records."""
    base = random_baselines(model, modes, ex, K, scale, int(cfg["random_baselines"]), gen)
    thresholds = {t: torch.maximum(float(cfg["converge_random"]) * base[t], float(cfg["converge_full"]) * full[t])
                  for t in ("q", "a")}  # "below either bound" = below the larger one
    results = {stage: optimize_stage(model, stage, modes, ex, K, thresholds, cfg, scale, gen, bar) for stage in STAGES}
    joint = results["joint"]["content"]
    decoded = {t: greedy_decode(model, prompt(modes[t], joint), ex[t].shape[1]) for t in ("q", "a")}
    torch.save({"K": K, "modes": modes, **{stage: r["content"] for stage, r in results.items()}},
               out_dir / f"contents_K{K}.pt")
    records = []
    ex_dir = out_dir / "examples" / f"K{K}"
    ex_dir.mkdir(parents=True, exist_ok=True)
    for i in range(ex["q"].shape[0]):
        rec: dict[str, Any] = {
            "K": K, "example": i,
            "text": {"story": decode_text(task, ex["story"][i]), "q": decode_text(task, ex["q"][i]),
                     "a": decode_text(task, ex["a"][i])},
            "random_baseline_loss": {t: float(base[t][i]) for t in ("q", "a")},
            "full_context_loss": {t: float(full[t][i]) for t in ("q", "a")},
            "threshold": {t: float(thresholds[t][i]) for t in ("q", "a")},
        }
        rec["stages"] = {}
        for stage, r in results.items():
            rec["stages"][stage] = {"loss": {t: float(v[i]) for t, v in r["loss"].items()}, "converged": bool(r["converged"][i]),
                          "restarts_used": int(r["restarts_used"][i]), "final_loss_per_restart": r["history"][i]}
        rec["decoded"] = {t: decode_text(task, decoded[t][i]) for t in ("q", "a")}
        rec["decode_correct"] = {t: bool((decoded[t][i] == ex[t][i]).all()) for t in ("q", "a")}
        rec["decode_token_accuracy"] = {t: float((decoded[t][i] == ex[t][i]).float().mean()) for t in ("q", "a")}
        (ex_dir / f"ex{i:03d}.json").write_text(json.dumps(rec, indent=1))
        records.append(rec)
    return records


def summarize_k(records: list[dict]) -> dict[str, float]:
    n = len(records)
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    conv = [r for r in records if r["stages"]["joint"]["converged"]]
    both = lambda r: r["decode_correct"]["q"] and r["decode_correct"]["a"]  # noqa: E731
    return {
        "examples": n,
        "converged_q": mean([r["stages"]["q"]["converged"] for r in records]),
        "converged_a": mean([r["stages"]["a"]["converged"] for r in records]),
        "converged_joint": mean([r["stages"]["joint"]["converged"] for r in records]),
        "decode_q": mean([r["decode_correct"]["q"] for r in records]),
        "decode_a": mean([r["decode_correct"]["a"] for r in records]),
        "decode_both": mean([both(r) for r in records]),
        "decode_both_of_converged": mean([both(r) for r in conv]),
        "single_loss_q": mean([r["stages"]["q"]["loss"]["q"] for r in records]),
        "single_loss_a": mean([r["stages"]["a"]["loss"]["a"] for r in records]),
        "joint_loss_q": mean([r["stages"]["joint"]["loss"]["q"] for r in records]),
        "joint_loss_a": mean([r["stages"]["joint"]["loss"]["a"] for r in records]),
        "random_baseline_q": mean([r["random_baseline_loss"]["q"] for r in records]),
        "random_baseline_a": mean([r["random_baseline_loss"]["a"] for r in records]),
        "full_context_q": mean([r["full_context_loss"]["q"] for r in records]),
        "full_context_a": mean([r["full_context_loss"]["a"] for r in records]),
    }


def summary_markdown(summary: dict) -> str:
    per_k, gen = summary["per_K"], summary["generator"]
    first = next(iter(per_k.values()))
    lines = [
        "# STM content optimization (Phase 1a)",
        "",
        f"{first['examples']} examples of {summary['task']}, generator {gen['source']}"
        + (f" (pretrained in the run: answer accuracy {gen['pretrain']['eval_answer_accuracy']:.3f})"
           if "pretrain" in gen else "")
        + f"; Adam lr {summary['config']['lr']}, {summary['config']['num_steps']} steps x up to "
        f"{summary['config']['num_restarts']} restarts; {summary['wall_seconds'] / 60:.1f} min wall.",
        "",
        "Converged: loss < 0.3 x random-content baseline or < 2 x full-context loss (joint: Q and A both).",
        f"Mean losses: random-content baseline Q {first['random_baseline_q']:.2f} / A {first['random_baseline_a']:.2f}"
        f" (at K={next(iter(per_k))}), full context Q {first['full_context_q']:.2f} / A {first['full_context_a']:.2f}.",
        "",
        "| K | conv. Q only | conv. A only | conv. joint | loss Q only | loss A only | joint loss Q | joint loss A "
        "| decode Q | decode A | decode Q and A | decode Q and A (converged) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for K, s in per_k.items():
        lines.append(f"| {K} | {s['converged_q']:.2f} | {s['converged_a']:.2f} | {s['converged_joint']:.2f} | "
                     f"{s['single_loss_q']:.3f} | {s['single_loss_a']:.3f} | "
                     f"{s['joint_loss_q']:.3f} | {s['joint_loss_a']:.3f} | {s['decode_q']:.2f} | {s['decode_a']:.2f} "
                     f"| {s['decode_both']:.2f} | {s['decode_both_of_converged']:.2f} |")
    return "\n".join(lines) + "\n"


def validate(cfg: dict) -> None:
    Ks = cfg["Ks"]
    if not isinstance(Ks, list) or not Ks:
        raise ValueError(f"Ks must be a non-empty list of content sizes, got {Ks!r}")
    for K in Ks:
        check_int("Ks[...] (K, the content slots)", K, low=1)
    check_int("num_examples", cfg["num_examples"], low=1)
    check_int("num_steps", cfg["num_steps"], low=1)
    check_int("num_restarts", cfg["num_restarts"], low=1)
    check_int("random_baselines", cfg["random_baselines"], low=1)
    check_float("lr", cfg["lr"], low=0.0)
    check_float("converge_random", cfg["converge_random"], low=0.0)
    check_float("converge_full", cfg["converge_full"], low=0.0)
    check_int("threads", cfg["threads"], low=1)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@hydra.main(version_base="1.3", config_path="pkg://rlmem.conf", config_name="stm_fit")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_container(cfg, resolve=True)
    if c["smoke"]:
        c = merge(c, c["smoke_overrides"])
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(c)
        task_cfg = dict(c["task"])
        task = build_task(task_cfg.pop("name"), **task_cfg)
        torch.set_num_threads(int(c["threads"]))
        torch.manual_seed(int(c["seed"]))
        ex = make_examples(task, int(c["num_examples"]), int(c["seed"]))
        model, gen_info = get_generator(c, task, out_dir)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"stm_fit: {err}") from None
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(c["seed"]))
    emb = model.get_input_embeddings().weight[: task.vocab_size]
    scale = float(emb.pow(2).mean().sqrt())  # contents and modes start at the scale of the task's token embeddings
    H = emb.shape[1]
    modes = {t: torch.randn(H, generator=gen) * scale for t in ("q", "a")}
    full = full_context_losses(model, ex)
    log.info("full-context loss: Q %.3f, A %.3f (mean over %d examples)", full["q"].mean(), full["a"].mean(),
             ex["q"].shape[0])
    Ks = [int(K) for K in c["Ks"]]
    total = len(Ks) * len(STAGES) * int(c["num_steps"]) * int(c["num_restarts"])
    per_k = {}
    with tqdm(total=total, desc="stm_fit", disable=not c["progress_bar"], dynamic_ncols=True) as bar:
        for K in Ks:
            bar.set_postfix_str(f"K={K}")
            records = run_k(model, task, ex, modes, K, full, c, scale, gen, bar, out_dir)
            per_k[K] = summarize_k(records)
            log.info("K=%d: converged Q %.2f, A %.2f, joint %.2f; decode Q and A %.2f", K, per_k[K]["converged_q"],
                     per_k[K]["converged_a"], per_k[K]["converged_joint"], per_k[K]["decode_both"])
    summary = {"task": repr(task), "generator": gen_info, "config": {k: c[k] for k in (
        "Ks", "num_examples", "num_steps", "num_restarts", "lr", "random_baselines", "converge_random", "converge_full",
        "seed", "smoke")}, "wall_seconds": time.perf_counter() - t0, "per_K": {str(K): s for K, s in per_k.items()}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    md = summary_markdown(summary)
    (out_dir / "summary.md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
