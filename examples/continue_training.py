"""Continued sparse training of a converted checkpoint on packed documents.

Conversion starts NSA as a near-copy of the dense model; continued training teaches the new parameters
(gates, compressors, independent branch projections) to use the sparse branches. Documents are packed
back to back into rows of --seq-len tokens the way transformers' DataCollatorWithFlattening packs them:
position ids restart at each document, and the NSA layers then compress, select and window each
document as if it were alone.

    nsa-convert examples/tiny-llama out/tiny-llama-nsa
    python examples/continue_training.py out/tiny-llama-nsa --steps 20 --seq-len 1024

Data: --data FILE or DIRECTORY (every *.py, *.txt and *.md file under it), by default the Python
standard library's sources. The new parameters get their own learning rate (--nsa-lr), the gates theirs
(--gate-lr; 0 holds them as converted, selection and window at 0.5 each: in docs/results.md, gates that
trained closed the selected branch, and held gates gave a smaller perplexity gap at 16k);
--warmup-nsa-only N trains only the new parameters for the first N steps. --distill-selection WEIGHT adds the
selection-distillation term (nsa_convert.enable_selection_distillation: it trains the key compressors
to rank blocks as full attention would, which top-n selection cannot learn from the loss);
--distill-pool P scores the most retrieval-like of P times as many drawn queries. Each step
logs the loss and, per layer, the mean of each branch's sigmoid gate (cmp, slc, win).
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoTokenizer, DataCollatorWithFlattening, PreTrainedModel

import nsa_convert
from nsa_convert.api import nsa_modules

TEXT_SUFFIXES = (".py", ".txt", ".md")
SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint converted by nsa-convert")
    parser.add_argument("--data", type=Path, help="text file or directory (default: Python's stdlib sources)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--batch-size", type=int, default=1, help="packed rows per step")
    parser.add_argument(
        "--lr", type=float, default=1e-5, help="learning rate of the dense model's parameters"
    )
    parser.add_argument("--nsa-lr", type=float, default=1e-3, help="learning rate of the new NSA parameters")
    parser.add_argument(
        "--gate-lr",
        type=float,
        metavar="LR",
        help="learning rate of the gates (default: --nsa-lr; 0 holds them)",
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="on weight matrices only")
    parser.add_argument(
        "--warmup-nsa-only", type=int, default=0, metavar="N", help="train only NSA for N steps"
    )
    parser.add_argument(
        "--distill-selection", type=float, default=0.0, metavar="WEIGHT",
        help="add WEIGHT × the selection-distillation KL to the loss (0: off)",
    )  # fmt: skip
    parser.add_argument(
        "--distill-queries", type=int, default=128, metavar="N",
        help="query positions per row and layer that selection distillation samples",
    )  # fmt: skip
    parser.add_argument(
        "--distill-pool", type=int, default=1, metavar="P",
        help="draw P × --distill-queries positions and score the most retrieval-like (1: uniform)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1… (auto: cuda when available)")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 autocast on CUDA"
    )
    parser.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    parser.add_argument("--repeat-batch", action="store_true", help="train on the first batch every step")
    parser.add_argument(
        "--save", type=Path, help="write the trained checkpoint here (loadable by nsa_convert.load)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seq_len < 2 or args.batch_size < 1 or args.warmup_nsa_only < 0:
        parser.error("--steps, --seq-len (≥ 2), --batch-size must be positive, --warmup-nsa-only ≥ 0")
    if args.distill_selection < 0 or args.distill_queries < 1 or args.distill_pool < 1:
        parser.error("--distill-selection must be ≥ 0, --distill-queries and --distill-pool ≥ 1")
    if min(args.lr, args.nsa_lr, args.gate_lr or 0.0, args.weight_decay) < 0:
        parser.error("learning rates and --weight-decay must be ≥ 0")
    return args


def text_files(data: Path | None) -> list[Path]:
    """The files to read, in a fixed order (the stdlib's sources when no --data is given)."""
    root = data if data is not None else Path(sysconfig.get_paths()["stdlib"])
    if root.is_file():
        return [root]
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
        files += [Path(directory, name) for name in sorted(names) if name.endswith(TEXT_SUFFIXES)]
    if not files:
        raise SystemExit(f"no {'/'.join(TEXT_SUFFIXES)} files under {root}")
    return files


def documents(tokenizer, files: list[Path], max_len: int) -> Iterator[list[int]]:
    """Token ids of each file (an EOS after each, when the tokenizer has one), cut into pieces of ≤ max_len.

    Pieces are separate documents: a file longer than a row continues in the next one, restarting.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    while True:  # cycle: a short --data file still feeds any number of steps
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            for start in range(0, len(ids), max_len):
                piece = ids[start : start + max_len]
                if len(piece) > 1:
                    yield piece


def packed_batches(pieces: Iterator[list[int]], seq_len: int, batch_size: int) -> Iterator[dict]:
    """Rows of exactly seq_len tokens, documents back to back (the last one of a row cut to fit).

    input_ids, labels (−100 at each document start: no token is predicted across documents) and
    position_ids restarting at 0 per document, all [batch_size, seq_len].
    """
    collator = DataCollatorWithFlattening(return_tensors="pt")
    carry: list[int] = []
    while True:
        rows = []
        for _ in range(batch_size):
            features, room = [], seq_len
            while room:
                piece = carry or next(pieces)
                features.append({"input_ids": piece[:room]})
                carry = piece[room:] if len(piece) - room > 1 else []
                room -= len(features[-1]["input_ids"])
            rows.append(collator(features))
        yield {key: torch.cat([row[key] for row in rows]) for key in ("input_ids", "labels", "position_ids")}


def gate_recorder(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Forward hooks on every NSA gate: the dict maps each layer to its last mean sigmoid gate (cmp, slc, win)."""
    means: dict[str, torch.Tensor] = {}
    for path, module in nsa_modules(model).items():

        def record(_module, _args, output, path=path, heads=module.num_q_heads):
            means[path] = torch.sigmoid(output.detach().float()).view(-1, heads, 3).mean(dim=(0, 1))

        module.gate.register_forward_hook(record)
    return means


def train(args: argparse.Namespace) -> list[dict]:
    """Run the training; returns one record per step (loss, phase, documents, speed, gate means per layer)."""
    torch.manual_seed(args.seed)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    autocast = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    model = nsa_convert.load(args.checkpoint, device=device, dtype=torch.float32, backend=args.backend)
    nsa_convert.enable_checkpointing(model)  # non-reentrant: selection distillation needs it
    if args.distill_selection:
        nsa_convert.enable_selection_distillation(model, args.distill_queries, args.distill_pool)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)

    new_ids = {id(p) for module in nsa_modules(model).values() for p in module.parameters()}
    if not new_ids:
        raise SystemExit(f"{args.checkpoint} has no NSA parameters: convert it with nsa-convert first")
    dense = [p for p in model.parameters() if id(p) not in new_ids]
    optimizer = torch.optim.AdamW(
        nsa_convert.parameter_groups(model, args.lr, args.nsa_lr, args.gate_lr, args.weight_decay)
    )
    gates = gate_recorder(model)
    batches = packed_batches(
        documents(tokenizer, text_files(args.data), args.seq_len), args.seq_len, args.batch_size
    )
    first = next(batches)
    history = []
    for step in range(args.steps):
        nsa_only = step < args.warmup_nsa_only
        for p in dense:
            p.requires_grad_(not nsa_only)
        batch = first if args.repeat_batch or step == 0 else next(batches)
        batch = {key: value.to(device) for key, value in batch.items()}
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, use_cache=False).loss
        total = loss
        if args.distill_selection:
            distill = nsa_convert.selection_distillation_loss(model)
            total = loss + args.distill_selection * distill
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # waits for the step's work (on a GPU) before the clock is read
        seconds = time.perf_counter() - start
        record = {
            "step": step + 1,
            "loss": loss_value,
            "nsa_only": nsa_only,
            "documents": int((batch["position_ids"] == 0).sum()),
            "tokens_per_s": batch["input_ids"].numel() / seconds,
            "gates": {path: mean.tolist() for path, mean in gates.items()},
        }
        if args.distill_selection:
            record["selection_kl"] = distill.item()
        history.append(record)
        print(format_record(record, args.steps), flush=True)
        if not math.isfinite(record["loss"]):
            raise SystemExit("the loss is not finite: lower the learning rates")
    if args.save is not None:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        print(f"saved to {args.save}")
    return history


def format_record(record: dict, steps: int) -> str:
    """One line for the step, then one per layer with its gate means."""
    phase = " (NSA only)" if record["nsa_only"] else ""
    lines = [
        f"step {record['step']}/{steps}  loss {record['loss']:.4f}  {record['documents']} documents  "
        f"{record['tokens_per_s']:.0f} tok/s{phase}"
        + (f"  selection KL {record['selection_kl']:.4f}" if "selection_kl" in record else "")
    ]
    for path, (cmp, slc, win) in record["gates"].items():
        lines.append(f"  {path}  gate cmp {cmp:.3f}  slc {slc:.3f}  win {win:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
