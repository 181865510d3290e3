"""Small-scale reproduction of the NSA paper's claim, through nsa-convert.

A dense GQA Llama (tens of millions of parameters, bytes as tokens) is pretrained on the Python standard
library's sources, saved as a Hugging Face checkpoint and converted by nsa-convert. The dense model and the
NSA model are then trained on the same further tokens at long context, and four models are evaluated:
dense (pretrained), dense (continued), NSA at conversion and NSA (continued):

- validation perplexity at each context length (held-out files; windows of their concatenation);
- passkey retrieval at each length: a five-digit key stated at a depth spread over the trials inside
  held-out code, asked for at the end. A trial counts when greedy decoding returns the key; one forward
  pass checks it, since greedy decoding yields the key exactly when every key digit is the argmax after
  the digits before it;
- for the NSA models, key-block recall at each passkey length: how often the selection of the query that
  predicts the answer's first digit includes the block where the key was stated, per layer; and that
  query's mean gates per layer (how much of the selected branch reaches the output).

Pretraining and continued training mix in passkey documents built from training files (--passkey-frac),
so that the dense model can retrieve before it is converted (the paper's models learned it at scale).

    python benchmarks/reproduce_paper.py --out runs/repro                 # the H100 preset
    python benchmarks/reproduce_paper.py --out /tmp/repro --preset tiny   # CPU, about a minute

Writes OUT/results.json, OUT/dense (pretrained checkpoint), OUT/nsa (its conversion) and, when matplotlib
is installed, OUT/perplexity.png and OUT/passkey.png.  Variants of the conversion and continued training
(--continue-steps, --nsa-warmup-steps, --distill-selection, --distill-pool, --gate-lr, --gate-cmp-logit,
--passkey-frac)
can start from one pretrained model: --dense OUT/dense.  --corpus DIR replaces the standard library by
other Python sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

import nsa_convert
from nsa_convert.api import nsa_modules
from nsa_convert.config import NSAConfig
from nsa_convert.nn.training import enable_selection_distillation, selection_distillation_loss

SEP = 256
"""Token between files (bytes are tokens 0–255)."""
VOCAB = 264
HELD_OUT = 20
"""One file in HELD_OUT (by a hash of its path) is validation text."""
DISTILL_QUERIES = 128
"""Query positions per row and layer that selection distillation samples."""
KEY_DIGITS = 5
"""Digits of a passkey: the row's last KEY_DIGITS tokens; the query KEY_DIGITS + 1 from the end predicts
the first of them."""


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    pretrain_len: int
    pretrain_steps: int
    pretrain_batch: int
    long_len: int
    continue_steps: int
    continue_batch: int
    lr: float
    continue_lr: float
    nsa_lr: float
    eval_lens: tuple[int, ...]
    eval_tokens: int
    passkey_lens: tuple[int, ...]
    passkey_trials: int
    nsa: dict
    eval_batch: int


PRESETS = {
    "h100": Preset(
        hidden=512, layers=8, heads=8, kv_heads=2, ffn=1408,
        pretrain_len=4096, pretrain_steps=1500, pretrain_batch=16,
        long_len=16384, continue_steps=200, continue_batch=4,
        lr=1.5e-3, continue_lr=3e-4, nsa_lr=1e-3,
        eval_lens=(1024, 2048, 4096, 8192, 16384), eval_tokens=1 << 20,
        passkey_lens=(4096, 8192, 16384), passkey_trials=50,
        nsa=dict(block_size=64, top_n=16, window=512, compress_block=32, compress_stride=16), eval_batch=8,
    ),
    "tiny": Preset(
        hidden=64, layers=2, heads=4, kv_heads=2, ffn=128,
        pretrain_len=128, pretrain_steps=30, pretrain_batch=4,
        long_len=256, continue_steps=4, continue_batch=2,
        lr=3e-3, continue_lr=1e-3, nsa_lr=1e-3,
        eval_lens=(32, 256), eval_tokens=1024,
        passkey_lens=(128, 256), passkey_trials=4,
        nsa=dict(block_size=16, top_n=3, window=32, compress_block=8, compress_stride=4), eval_batch=4,
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for checkpoints and results")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    parser.add_argument("--device", default="auto", help="cpu, cuda… (auto: cuda when available)")
    parser.add_argument(
        "--passkey-frac", type=float, default=0.1, help="share of training rows with a passkey"
    )
    parser.add_argument("--pretrain-steps", type=int, help="override the preset's")
    parser.add_argument(
        "--dense", type=Path, metavar="DIR",
        help="skip pretraining: start from this dense checkpoint (an earlier run's OUT/dense)",
    )  # fmt: skip
    parser.add_argument("--continue-steps", type=int, help="override the preset's")
    parser.add_argument(
        "--nsa-warmup-steps", type=int, default=0, metavar="N",
        help="of the NSA model's continued steps, the first N train only its new parameters",
    )  # fmt: skip
    parser.add_argument(
        "--distill-selection", type=float, default=0.0, metavar="WEIGHT",
        help="add WEIGHT × the selection-distillation loss (nsa_convert.nn.training) to the NSA model's loss",
    )  # fmt: skip
    parser.add_argument(
        "--distill-pool", type=int, default=1, metavar="P",
        help="selection distillation draws P × its queries and scores the most retrieval-like (1: uniform)",
    )  # fmt: skip
    parser.add_argument(
        "--gate-lr", type=float, metavar="LR",
        help="the NSA gates' learning rate (default: the NSA rate; 0 keeps them as converted)",
    )  # fmt: skip
    parser.add_argument(
        "--gate-cmp-logit", type=float, metavar="X",
        help="convert with this initial compressed-branch gate logit (NSAConfig.gate_cmp_logit; default −10: "
        "≈ 0, so the loss barely reaches the key compressor)",
    )  # fmt: skip
    parser.add_argument(
        "--corpus", type=Path, action="append", metavar="DIR",
        help="train and evaluate on the .py files under DIR (repeatable; default: the standard library)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dense is not None and args.pretrain_steps is not None:
        parser.error("--pretrain-steps has no effect with --dense (no pretraining)")
    if args.distill_pool < 1:
        parser.error("--distill-pool must be ≥ 1")
    return args


def corpus(roots: list[Path] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) token streams: the .py files under `roots` (default: the standard library's)
    as bytes, SEP after each file; one file in HELD_OUT, by a hash of its path under its root, is held out.
    Installed packages nested in a root (site-packages) and caches are skipped."""
    parts: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    sep = torch.tensor([SEP], dtype=torch.int16)
    for root in roots or [Path(sysconfig.get_paths()["stdlib"])]:
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if "site-packages" in relative or "__pycache__" in relative or not path.is_file():
                continue
            data = path.read_bytes()
            if data:
                held_out = zlib.crc32(relative.encode()) % HELD_OUT == 0
                parts[held_out] += [torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16), sep]
    if not parts[False] or not parts[True]:
        raise SystemExit(
            f"corpus: too few .py files under {', '.join(map(str, roots or []))} to hold some out"
        )
    return torch.cat(parts[False]).long(), torch.cat(parts[True]).long()


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.long)


def passkey_row(
    stream: torch.Tensor, length: int, depth: float, key: str, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """length tokens: filler from stream[start:], the key stated at `depth` of it, then the question and key.

    Also returns the positions of the key's digits where it is stated (it is stated twice): where a
    retrieving query must read.
    """
    before = "\n# The pass key is "
    between = ". Remember it. "
    intro = _encode(f"{before}{key}{between}{key} is the pass key.\n")
    question = _encode("\n# What is the pass key? The pass key is ")
    answer = _encode(key)
    filler = stream[start : start + length - len(intro) - len(question) - len(answer)]
    cut = int(depth * len(filler))
    row = torch.cat([filler[:cut], intro, filler[cut:], question, answer])
    first = cut + len(before)
    second = first + len(key) + len(between)
    return row, torch.cat([torch.arange(first, first + len(key)), torch.arange(second, second + len(key))])


def _key(gen: torch.Generator) -> str:
    return "".join(str(d) for d in torch.randint(0, 10, (KEY_DIGITS,), generator=gen).tolist())


def training_rows(stream: torch.Tensor, length: int, batch: int, passkey_frac: float, gen: torch.Generator):
    """Endless batches [batch, length] of random windows, a passkey_frac share of them passkey documents."""
    while True:
        rows = []
        for _ in range(batch):
            start = int(torch.randint(0, len(stream) - length, (1,), generator=gen))
            if torch.rand(1, generator=gen).item() < passkey_frac:
                depth = torch.rand(1, generator=gen).item()
                rows.append(passkey_row(stream, length, depth, _key(gen), start)[0])
            else:
                rows.append(stream[start : start + length])
        yield torch.stack(rows)


def optimizer(
    model: PreTrainedModel, lr: float, nsa_lr: float, gate_lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW over `nsa_convert.parameter_groups` (weight decay 0.1 on matrices)."""
    return torch.optim.AdamW(nsa_convert.parameter_groups(model, lr, nsa_lr, gate_lr, 0.1), betas=(0.9, 0.95))


def lr_scale(step: int, steps: int) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to 10% at the last step."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(
    model,
    rows,
    steps: int,
    lr: float,
    nsa_lr: float,
    device: torch.device,
    log: dict[str, list],
    only_new: int = 0,
    distill: float = 0.0,
    distill_pool: int = 1,
    gate_lr: float | None = None,
) -> float:
    """Train for `steps` steps, the first `only_new` of them updating only NSA's new parameters (the rest
    frozen, as a warm-up; they then join at the schedule's rate of that step, with fresh AdamW moments);
    with `distill` > 0, the loss adds distill × the selection-distillation term (its queries drawn from a
    pool distill_pool times larger).  Logs every step's language-modelling loss ("lm"), gradient norm
    before clipping ("grad_norm") and distillation term ("distill", when on).  gate_lr: the gates' own
    rate (see `optimizer`).  Returns tokens per second after the first step (compilation excluded; frozen
    steps are cheaper)."""
    if distill:
        enable_selection_distillation(model, DISTILL_QUERIES, distill_pool)
    opt = optimizer(model, lr, nsa_lr, gate_lr)
    base = [g["lr"] for g in opt.param_groups]
    new = {id(p) for module in nsa_modules(model).values() for p in module.parameters()}
    old = [p for p in model.parameters() if id(p) not in new]
    model.train()
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        for param in old:
            param.requires_grad_(step >= only_new)
        for group, lr0 in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr0 * lr_scale(step, steps)
        ids = next(rows).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        total = loss
        if distill:
            term = selection_distillation_loss(model)
            total = loss + distill * term
            log.setdefault("distill", []).append(round(term.item(), 4))
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.setdefault("lm", []).append(round(loss.item(), 4))
        log.setdefault("grad_norm", []).append(round(norm.item(), 4))
        if step == 0:
            start = time.perf_counter()
        else:
            tokens += ids.numel()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            extra = f", selection KL {log['distill'][-1]:.4f}" if distill else ""
            print(f"  step {step + 1}/{steps}: loss {log['lm'][-1]:.4f}{extra}", flush=True)
    for param in old:
        param.requires_grad_(True)
    if distill:
        enable_selection_distillation(model, 0)
    return tokens / (time.perf_counter() - start) if tokens else float("nan")


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, length: int, tokens: int, batch: int, device) -> float:
    """exp(mean next-token loss) over windows of `length` spread evenly over the stream."""
    count = max(1, min(tokens // length, (len(stream) - 1) // length))
    starts = torch.linspace(0, len(stream) - length - 1, count).long().tolist()
    total, n = 0.0, 0
    for i in range(0, count, batch):
        ids = torch.stack([stream[s : s + length] for s in starts[i : i + batch]]).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total, n = total + loss.item(), n + ids[:, 1:].numel()
    return math.exp(total / n)


def passkey_trials(stream, length: int, trials: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation's passkey rows of one length (depths spread over the filler) and their key positions."""
    gen = torch.Generator().manual_seed(seed + length)
    rows = []
    for i in range(trials):
        start = int(torch.randint(0, len(stream) - length, (1,), generator=gen))
        rows.append(passkey_row(stream, length, (i + 0.5) / trials, _key(gen), start))
    return rows


@torch.no_grad()
def passkey(model, stream, length: int, trials: int, batch: int, device, seed: int) -> dict:
    """Passkey retrieval over trials at depths spread over the filler, one forward pass per batch of them.

    "accuracy": the share of trials whose key digits greedy decoding returns.  For NSA models also
    "key_block_recall", how often the selection reaches the key: at the query that predicts the answer's
    first digit, whether a KV group's selected blocks include a block holding a digit of the stated key;
    "layers" (per layer, the share of trials × KV groups), "any" (the share of trials in which some layer
    and group selected it) and "in_window" (the share of trials whose statement the sliding window
    reaches anyway).  Low recall with a key outside the window: the key is never read.  And
    "gates_at_answer": per layer, the mean sigmoid gates (cmp, slc, win) of that query's heads: how much
    of what the selection reads reaches the output.
    """
    modules = nsa_modules(model)
    answer_rows: dict[str, torch.Tensor] = {}
    query = length - KEY_DIGITS - 1

    def keep(name: str, module, args: tuple) -> None:
        answer_rows[name] = module.selected_blocks(*args[:2])[:, query]

    gates: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def keep_gates(name: str, module, args: tuple, logits: torch.Tensor) -> None:
        heads = logits.shape[-1] // 3
        gates[name].append(torch.sigmoid(logits[:, query].float()).view(-1, heads, 3).mean(1).cpu())

    hooks = [
        module.register_forward_pre_hook(functools.partial(keep, name)) for name, module in modules.items()
    ] + [
        module.gate.register_forward_hook(functools.partial(keep_gates, name))
        for name, module in modules.items()
    ]
    rows, found, hits = passkey_trials(stream, length, trials, seed), [], 0
    try:
        for chunk in (rows[i : i + batch] for i in range(0, trials, batch)):
            answer_rows.clear()
            ids = torch.stack([row for row, _ in chunk]).to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=ids, use_cache=False).logits
            predicted = logits[:, -KEY_DIGITS - 1 : -1].argmax(-1)
            hits += (predicted == ids[:, -KEY_DIGITS:]).all(-1).sum().item()
            if modules:
                stated = torch.stack([at for _, at in chunk]).to(device)
                per_layer = []
                for name, module in modules.items():
                    chosen = answer_rows[name]  # (trials, KV groups, top_n), -1 = unused slot
                    blocks = stated // module.params.block_size
                    per_layer.append((chosen[..., None] == blocks[:, None, None, :]).any(-1).any(-1))
                found.append(torch.stack(per_layer, 1).cpu())
    finally:
        for hook in hooks:
            hook.remove()
    result: dict = {"accuracy": hits / trials}
    if modules:
        selected = torch.cat(found).float()
        window = next(iter(modules.values())).params.window
        in_window = [bool((at > query - window).any()) for _, at in rows]
        result["key_block_recall"] = {
            "layers": selected.mean((0, 2)).tolist(),
            "any": selected.flatten(1).any(1).float().mean().item(),
            "in_window": sum(in_window) / trials,
        }
        result["gates_at_answer"] = [torch.cat(gates[name]).mean(0).tolist() for name in modules]
    return result


def evaluate(model, val: torch.Tensor, preset: Preset, device, seed: int) -> dict:
    model.eval()
    retrieval = {
        str(n): passkey(model, val, n, preset.passkey_trials, preset.eval_batch, device, seed)
        for n in preset.passkey_lens
    }
    result = {
        "perplexity": {
            str(n): perplexity(model, val, n, preset.eval_tokens, preset.eval_batch, device)
            for n in preset.eval_lens
        },
        "passkey": {n: r["accuracy"] for n, r in retrieval.items()},
    }
    if nsa_modules(model):
        result["key_block_recall"] = {n: r["key_block_recall"] for n, r in retrieval.items()}
        result["gates_at_answer"] = {n: r["gates_at_answer"] for n, r in retrieval.items()}
    print(f"  {result}", flush=True)
    return result


def dense_model(preset: Preset) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=preset.hidden, intermediate_size=preset.ffn,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads, max_position_embeddings=preset.long_len, rope_theta=500000.0,
        bos_token_id=None, eos_token_id=SEP, pad_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def plot(results: dict, out: Path) -> list[str]:
    """perplexity.png and passkey.png, when matplotlib is installed; returns the files written.

    The perplexity axis stops at 1.25 × the largest value of the other models (the dense model beyond its
    pretraining length goes far above them), so their few-percent differences show; points cut off are
    labelled with their value.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", flush=True)
        return []
    models = results["models"]
    long_context = [v for name, m in models.items() if name != "dense" for v in m["perplexity"].values()]
    written = []
    for metric, ylabel in (("perplexity", "validation perplexity"), ("passkey", "passkey accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        top = 1.25 * max(long_context) if metric == "perplexity" and long_context else None
        for name, model in models.items():
            lengths = [int(n) for n in model[metric]]
            values = list(model[metric].values())
            (line,) = ax.plot(lengths, values, marker="o", label=name)
            for length, value in zip(lengths, values, strict=True):
                if top is not None and value > top:
                    ax.annotate(
                        f"{value:.1f}", (length, top), xytext=(0, -12), textcoords="offset points",
                        ha="center", color=line.get_color(),
                    )  # fmt: skip
        if top is not None:
            ax.set_ylim(0.97 * min(v for m in models.values() for v in m["perplexity"].values()), top)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=120)
        plt.close(fig)
        written.append(f"{metric}.png")
    return written


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {"pretrain_steps": args.pretrain_steps, "continue_steps": args.continue_steps}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train_stream, val = corpus(args.corpus)
    print(
        f"corpus: {len(train_stream) / 1e6:.1f} M training tokens, {len(val) / 1e6:.2f} M held out",
        flush=True,
    )
    results: dict = {"preset": args.preset, "settings": dataclasses.asdict(preset), "device": str(device)}
    results["settings"].update(
        passkey_frac=args.passkey_frac,
        nsa_warmup_steps=args.nsa_warmup_steps,
        distill_selection=args.distill_selection,
        distill_pool=args.distill_pool,
        gate_lr=args.gate_lr,
        gate_cmp_logit=args.gate_cmp_logit,
        dense=None if args.dense is None else str(args.dense),
    )
    results["corpus"] = {
        "roots": [str(root) for root in args.corpus or []] or ["stdlib"],
        "train_tokens": len(train_stream),
        "held_out_tokens": len(val),
    }
    results["software"] = {
        name: importlib.metadata.version(name)
        for name in ("torch", "transformers", "triton")
        if importlib.util.find_spec(name) is not None
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    losses: dict[str, dict[str, list]] = {}
    speed: dict[str, float] = {}
    models: dict[str, dict] = {}
    results.update(models=models, losses=losses, tokens_per_s=speed, seconds={})
    clock = time.perf_counter()

    def stage_done(name: str) -> None:
        """Record the stage's wall time and write what is known so far: a long run that is cut off
        still leaves its finished stages in results.json."""
        nonlocal clock
        results["seconds"][name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"  [{name}: {results['seconds'][name]} s]", flush=True)

    if args.dense is None:
        print("pretraining the dense model", flush=True)
        dense = dense_model(preset).to(device)
        rows = training_rows(train_stream, preset.pretrain_len, preset.pretrain_batch, args.passkey_frac, gen)
        losses["pretrain"] = {}
        speed["pretrain"] = train(
            dense, rows, preset.pretrain_steps, preset.lr, preset.lr, device, losses["pretrain"]
        )
        source = args.out / "dense"
        dense.save_pretrained(source)
        stage_done("pretrain")
    else:
        print(f"dense model: {args.dense}", flush=True)
        source = args.dense
        dense = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    results["parameters"] = sum(p.numel() for p in dense.parameters())
    shape = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    )
    results["dense_model"] = {field: getattr(dense.config, field) for field in shape}
    models["dense"] = evaluate(dense, val, preset, device, args.seed)
    stage_done("evaluate dense")

    print("converting", flush=True)
    start = time.perf_counter()
    overrides = {} if args.gate_cmp_logit is None else {"gate_cmp_logit": args.gate_cmp_logit}
    nsa_convert.convert(source, args.out / "nsa", NSAConfig(**preset.nsa, **overrides), overwrite=True)
    results["convert_s"] = time.perf_counter() - start
    nsa = nsa_convert.load(args.out / "nsa", device=device, dtype=torch.float32)
    models["nsa_converted"] = evaluate(nsa, val, preset, device, args.seed)
    stage_done("convert and evaluate")

    nsa_options = {
        "nsa_lr": preset.nsa_lr,
        "only_new": args.nsa_warmup_steps,
        "distill": args.distill_selection,
        "distill_pool": args.distill_pool,
        "gate_lr": args.gate_lr,
    }
    for name, model, options in (
        ("dense_continued", dense, {"nsa_lr": preset.continue_lr}),
        ("nsa_continued", nsa, nsa_options),
    ):
        print(f"continued training: {name}", flush=True)
        nsa_convert.enable_checkpointing(model)
        rows = training_rows(
            train_stream, preset.long_len, preset.continue_batch, args.passkey_frac,
            torch.Generator().manual_seed(args.seed + 1),
        )  # fmt: skip
        losses[name] = {}
        speed[name] = train(
            model, rows, preset.continue_steps, preset.continue_lr, device=device, log=losses[name], **options
        )
        models[name] = evaluate(model, val, preset, device, args.seed)
        stage_done(f"train and evaluate {name}")

    longest = str(max(preset.eval_lens))
    results["nsa_vs_dense_perplexity"] = {
        n: models["nsa_continued"]["perplexity"][n] / models["dense_continued"]["perplexity"][n]
        for n in models["dense"]["perplexity"]
    }
    results["targets"] = {
        "nsa_within_3pct_of_dense_at_longest": results["nsa_vs_dense_perplexity"][longest] <= 1.03,
        "nsa_passkey_at_longest": models["nsa_continued"]["passkey"][str(max(preset.passkey_lens))],
    }
    results["plots"] = plot(results, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in ("nsa_vs_dense_perplexity", "targets")}, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
