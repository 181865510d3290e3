"""The two verbs: `convert(src, out, NSAConfig(...))` and `load(out)`.  The CLI is a thin shell over them."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from nsa_convert import __version__
from nsa_convert.capture import Captured, capture, quiet_transformers, read_config
from nsa_convert.checkpoint import CheckpointReader, ShardWriter, TensorSpec, check_output, staged_output
from nsa_convert.config import NSAConfig
from nsa_convert.errors import CheckpointError, ConfigError, NSAConvertError, UnsupportedModelError
from nsa_convert.nn.attention import nsa_modules
from nsa_convert.nn.install import build_site_module, install_nsa
from nsa_convert.passes import RetargetDevice, plan_sites, rewrite_sites
from nsa_convert.sites import AttentionSite, converted

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Files beside the weights that a converted checkpoint needs to be used as the source was.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class Plan:
    """A model captured from its config, and the verdict for each attention site."""

    model_dir: Path
    model_config: PretrainedConfig
    captured: Captured
    sites: list[AttentionSite]
    config: NSAConfig


@dataclass
class ConversionReport:
    source: Path
    output: Path
    sites: list[AttentionSite]
    tensors_copied: int
    tensors_added: int
    bytes_written: int
    shards: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "converted_sites": len(converted(self.sites)),
            "dense_sites": len(self.sites) - len(converted(self.sites)),
            "sites": [site.to_dict() for site in self.sites],
            "tensors_copied": self.tensors_copied,
            "tensors_added": self.tensors_added,
            "bytes_written": self.bytes_written,
            "shards": self.shards,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


@contextmanager
def _concerning(path: Path) -> Iterator[None]:
    """Errors raised in the block that name no file are about `path`."""
    try:
        yield
    except NSAConvertError as err:
        if err.path is None:
            err.path = path
        raise


def plan(model_dir: str | Path, config: NSAConfig | None = None, *, trust_remote_code: bool = False) -> Plan:
    """Capture the model of `model_dir/config.json` (no weights read) and decide each attention site."""
    model_dir = Path(model_dir)
    model_config = read_config(model_dir, trust_remote_code=trust_remote_code)
    return _plan(model_dir, model_config, config or NSAConfig(), trust_remote_code=trust_remote_code)


def _plan(
    model_dir: Path,
    model_config: PretrainedConfig,
    config: NSAConfig,
    *,
    trust_remote_code: bool,
) -> Plan:
    with _concerning(model_dir / "config.json"):
        captured = capture(model_config, trust_remote_code=trust_remote_code)
        sites = plan_sites(captured.graph_module, model_config, config)
    if not sites:
        raise UnsupportedModelError("no attention call found in the model's graph", model_dir / "config.json")
    if not converted(sites):
        reasons = sorted({site.reason for site in sites if site.reason})
        raise UnsupportedModelError(
            "no attention site NSA can take: " + "; ".join(reasons), model_dir / "config.json"
        )
    return Plan(model_dir, model_config, captured, sites, config)


def expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes the config implies, and for tied parameters the name they share storage with."""
    shapes, first_name, aliases = {}, {}, {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        shapes[name] = tuple(tensor.shape)
        owner = first_name.setdefault(id(tensor), name)
        if owner != name:
            aliases[name] = owner
    persistent = set(model.state_dict())
    return {name: shape for name, shape in shapes.items() if name in persistent}, aliases


def check_weights(reader: CheckpointReader, model: nn.Module) -> list[str]:
    """Every tensor the config implies is present with its shape (tied copies may be absent).

    Returns notes on tensors the checkpoint holds beyond what the model uses (they are copied).
    """
    expected, aliases = expected_tensors(model)
    present = set(reader.names())
    for name, shape in expected.items():
        if name not in present:
            if name in aliases and aliases[name] in present:
                continue
            tied_to = next((a for a, owner in aliases.items() if owner == name and a in present), None)
            if tied_to is None:
                raise CheckpointError(f"tensor '{name}' is missing from the checkpoint", reader.model_dir)
            continue
        info = reader.meta(name)
        if tuple(info.shape) != shape:
            raise CheckpointError(
                f"tensor '{name}' has shape {list(info.shape)} but config.json implies {list(shape)}",
                info.shard,
            )
    extra = sorted(present - set(expected))
    return (
        [f"{len(extra)} tensors not used by the model are copied unchanged: {', '.join(extra[:5])}"]
        if extra
        else []
    )


def _new_dtype(config: NSAConfig, reader: CheckpointReader, site: AttentionSite) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return reader.meta(f"{site.query_proj}.weight").dtype


def _independent_copies(sites: list[AttentionSite], reader: CheckpointReader) -> dict[str, list[str]]:
    """source tensor name → the names of its copies in the independent branches' projections."""
    copies: dict[str, list[str]] = {}
    names = set(reader.names())
    for site in sites:
        for kind, proj in (("k", site.key_proj), ("v", site.value_proj)):
            for param in ("weight", "bias"):
                if f"{proj}.{param}" in names:
                    copies[f"{proj}.{param}"] = [
                        f"{site.module}.nsa.{kind}_proj_{b}.{param}" for b in ("cmp", "slc")
                    ]
    return copies


def initial_nsa_tensors(plan_: Plan, reader: CheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    """The conversion initialisation of each converted site's new parameters (copies excluded)."""
    for index, site in enumerate(converted(plan_.sites)):
        torch.manual_seed(plan_.config.seed + index)
        module = build_site_module(plan_.captured.model, site, plan_.config, placed=False)
        dtype = _new_dtype(plan_.config, reader, site)
        for name, tensor in module.state_dict().items():
            if not name.startswith(("k_proj_", "v_proj_")):
                yield f"{site.module}.nsa.{name}", tensor.to(dtype)


def nsa_section(plan_: Plan, reader: CheckpointReader) -> dict:
    return {
        "converter": "nsa-convert",
        "version": __version__,
        "config": plan_.config.to_dict(),
        "sites": [site.to_dict() for site in plan_.sites],
        "source_fingerprint": reader.fingerprint(),
    }


def model_card(plan_: Plan) -> str:
    sites = converted(plan_.sites)
    dense = [site for site in plan_.sites if not site.convert]
    cfg = plan_.config
    lines = [
        f"# {plan_.model_dir.name} (Native Sparse Attention)",
        "",
        f"Converted by nsa-convert {__version__} from `{plan_.model_dir.name}` "
        f"({type(plan_.model_config).__name__.removesuffix('Config')}).",
        "",
        f"- {len(sites)} attention sites use NSA, {len(dense)} stay dense.",
        f"- Compression: block {cfg.compress_block}, stride {cfg.compress_stride}; selection: block "
        f"{cfg.block_size}, top {cfg.top_n}; window {cfg.window}; branch k/v: {cfg.branch_kv}.",
        "- The original tensors are unchanged; the new ones live under `<attention module>.nsa.`.",
        "",
        "```python",
        "import nsa_convert",
        "model = nsa_convert.load('path/to/this/directory')",
        "```",
    ]
    lines += [f"- kept dense: `{site.module}`: {site.reason}" for site in dense]
    return "\n".join(lines) + "\n"


def _files_to_copy(reader: CheckpointReader, raw_config: dict, trust_remote_code: bool) -> list[Path]:
    """Tokenizer and generation files, and a trusted model's own code (its `.py` files) when it has some."""
    names = list(COPIED_FILES)
    if trust_remote_code and raw_config.get("auto_map"):
        names += sorted(path.name for path in reader.model_dir.glob("*.py"))
    paths = (reader.local_file(name) for name in names)
    return [path for path in paths if path is not None]


class _Background:
    """`fn()` on a daemon thread: a Ctrl-C on the main thread ends the process without waiting for it."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._finished = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(fn,), name=name, daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # handed to the main thread by result()
            self._error = exc
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def settle(self) -> None:
        """Wait for `fn` to end, whatever its outcome (so that no capture outlives a failed conversion)."""
        self._finished.wait()

    def result(self) -> Any:
        self._finished.wait()
        if self._error is not None:
            raise self._error
        return self._result


def _copies_in_order(plan_: Plan, reader: CheckpointReader) -> list[tuple[str, str]]:
    """(source tensor, name of its copy) for the independent branches' projections, in writing order."""
    if plan_.config.branch_kv != "independent":
        return []
    copies = _independent_copies(converted(plan_.sites), reader)
    return [(source, alias) for source, aliases in copies.items() for alias in aliases]


def _specs(reader: CheckpointReader, planning: _Background) -> Iterator[TensorSpec]:
    """What the conversion writes, in order: the source tensors, then (once the plan is known) the copies
    of the independent branches and the new tensors."""
    for name in reader.names():
        info = reader.meta(name)
        yield TensorSpec(name, info.shape, info.dtype)
    plan_, _ = planning.result()
    for source, alias in _copies_in_order(plan_, reader):
        info = reader.meta(source)
        yield TensorSpec(alias, info.shape, info.dtype)
    for name, tensor in initial_nsa_tensors(plan_, reader):
        yield TensorSpec.of(name, tensor)


def convert(
    model_dir: str | Path,
    out_dir: str | Path,
    config: NSAConfig | None = None,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: ProgressCallback | None = None,
) -> ConversionReport:
    """Convert a dense checkpoint into an NSA one, streaming tensor by tensor; OUT_DIR appears only when complete.

    The cheap checks come first (config, OUT_DIR, weight headers).  The capture (then the comparison of
    the shapes it implies with the checkpoint's) runs on a second thread while the source tensors are
    copied — by the kernel, file to file — into OUT_DIR's staging directory: a failure there stops the
    copy at once.  The new tensors come last.  Memory stays at one tensor plus the captured graph,
    whatever the size of the model.
    """
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = config or NSAConfig()
    model_config = read_config(model_dir, trust_remote_code=trust_remote_code)
    check_output(out_dir, overwrite=overwrite, source=model_dir)
    reader = CheckpointReader(model_dir, allow_pickle=allow_pickle)
    raw_config = json.loads((model_dir / "config.json").read_text())
    to_copy = _files_to_copy(reader, raw_config, trust_remote_code)

    def planned() -> tuple[Plan, list[str]]:
        plan_ = _plan(model_dir, model_config, config, trust_remote_code=trust_remote_code)
        return plan_, check_weights(reader, plan_.captured.model)

    copied = added = 0
    with staged_output(out_dir, overwrite=overwrite, source=model_dir) as staging:
        planning = _Background(planned, name="nsa-convert capture")
        writer = ShardWriter(staging, _specs(reader, planning), max_shard_bytes=max_shard_bytes)
        total, done = reader.total_bytes, 0
        try:
            for name, tensor in reader.iter_stored():
                if planning.done():
                    planning.result()  # a model NSA cannot take, or weights that disagree: stop now
                writer.add(name, tensor)
                copied += 1
                done += reader.meta(name).nbytes
                if progress:
                    progress(name, done, total)
        except Exception:
            planning.settle()  # torch.export is not thread-safe: the caller may capture again next
            raise
        plan_, notes = planning.result()
        for source, alias in _copies_in_order(plan_, reader):
            writer.add(alias, reader.get(source))
            added += 1
        for name, tensor in initial_nsa_tensors(plan_, reader):
            writer.add(name, tensor)
            added += 1
        index = writer.finalize({"nsa_convert_version": __version__})
        raw_config["nsa"] = nsa_section(plan_, reader)
        (staging / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
        for source in to_copy:
            shutil.copyfile(source, staging / source.name)
        (staging / "README.md").write_text(model_card(plan_))
    shards = sorted(set(index["weight_map"].values()))
    return ConversionReport(
        source=model_dir,
        output=out_dir,
        sites=plan_.sites,
        tensors_copied=copied,
        tensors_added=added,
        bytes_written=sum((out_dir / shard).stat().st_size for shard in shards),
        shards=shards,
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def read_nsa_section(model_dir: Path) -> tuple[NSAConfig, list[AttentionSite]]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError("config.json not found", model_dir)
    try:
        section = json.loads(path.read_text()).get("nsa")
    except json.JSONDecodeError as err:
        raise ConfigError(f"not valid JSON ({err})", path) from None
    if not isinstance(section, dict):
        raise ConfigError("no 'nsa' section: not a checkpoint converted by nsa-convert", path)
    return NSAConfig.from_dict(section["config"]), [
        AttentionSite.from_dict(site) for site in section["sites"]
    ]


def load(
    out_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    backend: str = "auto",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A converted checkpoint as a trainable transformers model with NSA at every converted site.

    The module tree is the original one plus an `nsa` child per converted attention module, so
    per-layer FSDP wrapping and activation checkpointing work as for the dense model.
    `trust_remote_code`: the model ships its own code (converted with --trust-remote-code).
    """
    out_dir = Path(out_dir)
    config, sites = read_nsa_section(out_dir)
    with quiet_transformers():  # from_pretrained reports the NSA tensors as unused: they are loaded below
        model = AutoModelForCausalLM.from_pretrained(
            str(out_dir),
            dtype=dtype or "auto",
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        )
    modules = install_nsa(model, sites, config)
    for module in modules:
        module.backend = backend
    reader = CheckpointReader(out_dir)
    expected = [name for name in model.state_dict() if ".nsa." in name]
    missing = sorted(set(expected) - set(reader.names()))
    if missing:
        raise CheckpointError(f"{len(missing)} NSA tensors are missing, e.g. '{missing[0]}'", out_dir)
    model.load_state_dict({name: reader.get(name) for name in expected}, strict=False)
    if device is not None:
        model.to(device)
    return model


def parameter_groups(
    model: nn.Module, lr: float, nsa_lr: float, gate_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups for continued training: the dense model's parameters at lr, NSA's new ones at nsa_lr,
    its gates at gate_lr (default nsa_lr); weight decay on matrices only, never on norms, biases or the
    gates' initial logits. gate_lr=0 holds the gates as converted (which kept the selected branch open in
    docs/results.md): they are frozen (requires_grad off) and left out of the groups, so no scheduler, Adam
    state or gradient clipping touches them; any other gate_lr turns their gradients back on. A model
    without NSA layers gets all its parameters at lr."""
    modules = list(nsa_modules(model).values())
    gates = {id(p) for module in modules for p in module.gate.parameters()}
    new = {id(p) for module in modules for p in module.parameters()} - gates
    gate_lr = nsa_lr if gate_lr is None else gate_lr
    for module in modules:
        module.gate.requires_grad_(gate_lr != 0)
    owners = [(lr, lambda i: i not in new and i not in gates), (nsa_lr, new.__contains__)]
    if gate_lr != 0:
        owners.append((gate_lr, gates.__contains__))
    groups = []
    for rate, owned in owners:
        chosen = [p for p in model.parameters() if owned(id(p))]
        groups += [
            {"params": [p for p in chosen if p.dim() >= 2], "lr": rate, "weight_decay": weight_decay},
            {"params": [p for p in chosen if p.dim() < 2], "lr": rate, "weight_decay": 0.0},
        ]
    return [group for group in groups if group["params"]]


def _bind(graph_module: torch.fx.GraphModule, model: nn.Module) -> None:
    """Point the graph's parameters and buffers at the model's tensors (same names, shared storage)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        prefix, _, leaf = name.rpartition(".")
        try:
            owner = graph_module.get_submodule(prefix)
        except AttributeError:
            continue
        if hasattr(owner, leaf):
            setattr(owner, leaf, tensor)


def rewritten_graph(plan_: Plan, model: nn.Module | None = None) -> torch.fx.GraphModule:
    """The captured graph with every converted site rewritten into NSA.

    Without `model` the graph keeps meta parameters and freshly initialised NSA modules (enough to
    inspect or export it).  With a loaded model it shares the model's tensors and NSA modules and runs
    on their device: it then computes the same function as the model.
    """
    graph_module = plan_.captured.graph_module
    if model is None:
        modules = {
            site.module: build_site_module(plan_.captured.model, site, plan_.config)
            for site in converted(plan_.sites)
        }
    else:
        modules = nsa_modules(model)
    rewrite_sites(graph_module, modules)
    if model is not None:
        _bind(graph_module, model)
        RetargetDevice(next(model.parameters()).device)(graph_module)
    return graph_module
