"""Check a converted checkpoint before trusting it: integrity, completeness, loadability, equivalence.

`verify(out_dir)` checks the invariants `convert` establishes: every shard has the sha256 the index
records; every tensor the config implies (the model's state dict with NSA installed, built on the meta
device) is present with its shape, and nothing else under an `.nsa.` name; original tensors keep a
floating dtype where the model has one; each site's new tensors share one dtype (the `dtype` option, or
that of the site's query projection) and its independent-branch copies keep their source's; the
directory loads with `nsa_convert.load`.  With `against`, the original tensors must have the dense
source's names, shapes and dtypes, and the logits must match the dense model's at T ≤ min(w, n·l'), where
conversion is exact up to the compression gate's sigmoid(-10).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from nsa_convert import __version__
from nsa_convert.api import expected_tensors, load, read_nsa_section
from nsa_convert.capture import build_meta_model, choose_attn_implementation, read_config
from nsa_convert.checkpoint import CheckpointReader
from nsa_convert.checkpoint.reader import INDEX_NAME
from nsa_convert.config import NSAConfig
from nsa_convert.errors import CheckpointError, NSAConvertError, UsageError
from nsa_convert.nn.install import install_nsa
from nsa_convert.sites import AttentionSite, converted

SCHEMA = "nsa-convert.verify/1"
CHECKS = ("nsa_section", "shard_hashes", "headers", "tensors", "load", "logits")
DEFAULT_TOLERANCE = 1e-3
MAX_SEQ_LEN = 128  # the default T: long enough to cross several blocks, short enough for a CPU
_LISTED = 5  # problems of one kind listed by name before "and N more"
_HASH_CHUNK = 1 << 20


@dataclass
class VerifyReport:
    """The outcome of `verify`: `ok` when `problems` is empty; `checks` maps each check to ok/failed/skipped."""

    out_dir: Path
    against: Path | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=lambda: dict.fromkeys(CHECKS, "skipped"))
    tensors: int = 0
    shards: list[str] = field(default_factory=list)
    seq_len: int | None = None
    logits_error: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def record(self, check: str, problems: list[str]) -> bool:
        """Add a check's problems; returns whether it passed."""
        self.problems += problems
        self.checks[check] = "failed" if problems else "ok"
        return not problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "out_dir": str(self.out_dir),
            "against": None if self.against is None else str(self.against),
            "ok": self.ok,
            "checks": self.checks,
            "problems": self.problems,
            "notes": self.notes,
            "tensors": self.tensors,
            "shards": self.shards,
            "logits": None
            if self.logits_error is None
            else {"seq_len": self.seq_len, "relative_error": self.logits_error, "tolerance": self.tolerance},
            "seconds": round(self.seconds, 3),
        }


def _listed(kind: str, names: list[str]) -> list[str]:
    """One problem per name for the first few, then one line for the rest."""
    problems = [kind.format(name) for name in names[:_LISTED]]
    if len(names) > _LISTED:
        problems.append(f"... and {len(names) - _LISTED} more like it")
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard_hashes(out_dir: Path) -> tuple[list[str], list[str]]:
    """Every shard the index names exists, has the sha256 recorded at conversion, and no other shard lies
    beside them; returns (problems, shard names)."""
    index_path = out_dir / INDEX_NAME
    if not index_path.is_file():
        return [f"{INDEX_NAME} is missing (nsa-convert always writes one)"], []
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map, metadata = index["weight_map"], index.get("metadata") or {}
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{INDEX_NAME} is not a valid index ({type(err).__name__}: {err})"], []
    hashes = metadata.get("shard_sha256") if isinstance(metadata, dict) else None
    if isinstance(hashes, dict) and hashes:
        problems = [f"shard '{s}' has no sha256 in {INDEX_NAME}" for s in shards if s not in hashes]
        problems += [
            f"{INDEX_NAME} records a sha256 for '{s}', which holds no tensor"
            for s in hashes
            if s not in shards
        ]
    else:
        problems, hashes = (
            [f"{INDEX_NAME} records no shard_sha256: not written by nsa-convert, or edited"],
            {},
        )
    for shard in shards:
        if not isinstance(shard, str) or PurePosixPath(shard).name != shard:
            problems.append(f"shard name {shard!r} is not a file of the directory")
            continue
        path = out_dir / shard
        if not path.is_file():
            problems.append(f"shard '{shard}' is missing")
        elif shard in hashes and _sha256(path) != hashes[shard]:
            problems.append(
                f"shard '{shard}' does not have the sha256 recorded in {INDEX_NAME}: it changed after conversion"
            )
    stray = sorted(p.name for p in out_dir.glob("*.safetensors") if p.name not in shards)
    problems += _listed("'{}' is not in " + INDEX_NAME, stray)
    return problems, shards


def _meta_model(out_dir: Path, config: NSAConfig, sites: list[AttentionSite]) -> nn.Module:
    """The model config.json describes, with NSA installed, on the meta device: the tensors to expect."""
    model_config = read_config(out_dir)
    model = build_meta_model(model_config, choose_attn_implementation(model_config))
    install_nsa(model, sites, config)
    return model


def _nsa_dtype_problems(reader: CheckpointReader, config: NSAConfig, sites: list[AttentionSite]) -> list[str]:
    """Each site's new tensors have one dtype; its independent k/v copies keep their dense tensor's."""
    present = set(reader.names())
    problems = []
    for site in converted(sites):
        prefix = f"{site.module}.nsa."
        if config.dtype != "auto":
            expected, why = getattr(torch, config.dtype), f"the dtype option is {config.dtype}"
        elif f"{site.query_proj}.weight" in present:
            expected = reader.meta(f"{site.query_proj}.weight").dtype
            why = f"'{site.query_proj}.weight' is {expected}"
        else:
            continue
        for name in sorted(n for n in present if n.startswith(prefix)):
            local = name.removeprefix(prefix)
            want, reason = expected, why
            if local.startswith(("k_proj_", "v_proj_")):
                dense = f"{site.key_proj if local[0] == 'k' else site.value_proj}.{local.rpartition('.')[2]}"
                if dense not in present:
                    continue
                want, reason = reader.meta(dense).dtype, f"it is a copy of '{dense}'"
            actual = reader.meta(name).dtype
            if actual != want:
                problems.append(f"tensor '{name}' is {actual}, expected {want} ({reason})")
    return problems


def check_tensors(
    out_dir: Path,
    reader: CheckpointReader,
    config: NSAConfig,
    sites: list[AttentionSite],
    source: CheckpointReader | None = None,
) -> tuple[list[str], list[str]]:
    """Names, shapes and dtypes against the meta model (and the dense source's reader); (problems, notes)."""
    model = _meta_model(out_dir, config, sites)
    expected, aliases = expected_tensors(model)
    meta = dict(model.state_dict(keep_vars=True))
    present = set(reader.names())
    tied_present = {owner for alias, owner in aliases.items() if alias in present}
    missing = [
        name
        for name in expected
        if name not in present and aliases.get(name) not in present and name not in tied_present
    ]
    problems = _listed("tensor '{}' is missing", sorted(missing))
    shapes = [
        f"tensor '{name}' has shape {list(reader.meta(name).shape)}, config.json implies {list(shape)}"
        for name, shape in expected.items()
        if name in present and tuple(reader.meta(name).shape) != shape
    ]
    problems += shapes[:_LISTED]
    not_float = sorted(
        name
        for name in expected
        if name in present
        and meta[name].is_floating_point()
        and not reader.meta(name).dtype.is_floating_point
    )
    problems += _listed("tensor '{}' should be floating point", not_float)
    problems += _nsa_dtype_problems(reader, config, sites)

    extra = sorted(present - set(expected))
    problems += _listed(
        "unexpected tensor '{}': no NSA module of config.json has it", [n for n in extra if ".nsa." in n]
    )
    unused = [n for n in extra if ".nsa." not in n]
    notes = []
    if source is None:
        if unused:
            notes.append(
                f"{len(unused)} tensors the model does not use (copied from the source?): {', '.join(unused[:_LISTED])}"
            )
        return problems, notes
    original = set(source.names())
    problems += _listed("tensor '{}' is not in the dense source", [n for n in unused if n not in original])
    problems += _listed("tensor '{}' of the dense source is missing", sorted(original - present))
    for name in sorted(original & present):
        ours, theirs = reader.meta(name), source.meta(name)
        if (ours.shape, ours.dtype) != (theirs.shape, theirs.dtype):
            problems.append(
                f"tensor '{name}' is {ours.dtype}{list(ours.shape)}, the dense source's is {theirs.dtype}{list(theirs.shape)}"
            )
    return problems, notes


def default_seq_len(config: NSAConfig, model_config: PretrainedConfig) -> int:
    """The longest T ≤ MAX_SEQ_LEN at which conversion is exact: T ≤ min(w, n·l', max positions)."""
    limit = min(config.window, config.top_n * config.block_size, MAX_SEQ_LEN)
    positions = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    return min(limit, positions) if positions else limit


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _load_dense(model_dir: Path, device: str) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
        )
    except Exception as err:  # transformers raises many types; the user needs the first line
        raise CheckpointError(f"cannot load the dense model: {_first_line(err)}", model_dir) from None
    return model.to(device).eval()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a loading bar per model; a check's output should be its findings only."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_load_and_logits(report: VerifyReport, config: NSAConfig, device: str) -> None:
    """Load the converted model; run it on T random tokens; with `against`, compare with the dense logits."""
    try:
        model = load(report.out_dir, device=device, dtype=torch.float32).eval()
    except Exception as err:  # whatever breaks loading is the finding
        report.record("load", [f"does not load: {_first_line(err)}"])
        return
    seq_len = report.seq_len or default_seq_len(config, model.config)
    report.seq_len = seq_len
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, seq_len), generator=generator).to(
        device
    )
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    if not report.record(
        "load", [] if torch.isfinite(logits).all() else [f"logits at T={seq_len} are not finite"]
    ):
        return
    if report.against is None:
        return
    dense = _load_dense(report.against, device)
    with torch.no_grad():
        reference = dense(ids, use_cache=False).logits
    report.logits_error = _relative_error(logits, reference)
    within = report.logits_error <= report.tolerance
    report.record(
        "logits",
        []
        if within
        else [
            f"logits differ from the dense model's: relative error {report.logits_error:.2e} > "
            f"{report.tolerance:g} at T={seq_len}"
        ],
    )


def verify(
    out_dir: str | Path,
    against: str | Path | None = None,
    *,
    seq_len: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> VerifyReport:
    """Verify a converted checkpoint; problems with it are returned in the report, never raised.

    Raises only for bad arguments (UsageError) or a dense `against` directory that cannot be read
    (ConfigError, CheckpointError).  The load and logits checks run only when the static checks pass.
    """
    start = time.perf_counter()
    report = VerifyReport(Path(out_dir), None if against is None else Path(against), tolerance=tolerance)
    report.seq_len = seq_len
    source = None
    if report.against is not None:
        read_config(report.against)
        source = CheckpointReader(report.against, allow_pickle=allow_pickle)
    if not report.out_dir.is_dir():
        report.record("nsa_section", ["is not a directory" if report.out_dir.exists() else "does not exist"])
        return _done(report, start)
    try:
        config, sites = read_nsa_section(report.out_dir)
    except NSAConvertError as err:
        report.record("nsa_section", [err.message])
        return _done(report, start)
    except (KeyError, TypeError, ValueError) as err:
        report.record("nsa_section", [f"the config.json 'nsa' section is malformed ({_first_line(err)})"])
        return _done(report, start)
    report.record("nsa_section", [])
    if seq_len is not None and not 0 < seq_len <= min(config.window, config.top_n * config.block_size):
        raise UsageError(
            f"--seq-len must be between 1 and min(window, top_n * block_size) = "
            f"{min(config.window, config.top_n * config.block_size)}, where NSA equals dense attention"
        )
    section = json.loads((report.out_dir / "config.json").read_text())["nsa"]
    if section.get("version") != __version__:
        report.notes.append(f"converted by nsa-convert {section.get('version')}; this is {__version__}")
    if source is not None and section.get("source_fingerprint") != source.fingerprint():
        report.notes.append(
            f"{report.against}'s weight files differ from those this checkpoint was converted from "
            "(another model, or re-saved): the logits comparison decides"
        )

    hash_problems, report.shards = check_shard_hashes(report.out_dir)
    report.record("shard_hashes", hash_problems)
    try:
        reader = CheckpointReader(report.out_dir)
    except CheckpointError as err:
        report.record("headers", [str(err)])
        return _done(report, start)
    report.record("headers", [])
    report.tensors = len(reader.names())
    try:
        problems, notes = check_tensors(report.out_dir, reader, config, sites, source)
    except NSAConvertError as err:
        problems, notes = [f"cannot build the model config.json describes: {err}"], []
    report.notes += notes
    report.record("tensors", problems)
    if report.ok:
        with _no_progress_bars():
            _check_load_and_logits(report, config, device)
    return _done(report, start)


def _done(report: VerifyReport, start: float) -> VerifyReport:
    report.seconds = time.perf_counter() - start
    return report
