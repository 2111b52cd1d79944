"""Routing returned by vLLM or SGLang (`--enable-return-routed-experts`) -> one request's int16 [N, L, k], -1 where
the engine captured nothing. `workbench import-routing` (import_command.py) writes these into a trace store.

Design choices:
- One normal form for every released output format: the request's N token ids (prompt, then generated) and
  expert_ids [N, L, k] over the model's MoE layers, the trace schema's own `expert_ids`. Positions the engine did
  not route are -1, the schema's fill, so every analysis already ignores them; they are counted by reason
  (`REASONS`) instead of guessed.
- Formats, told apart by the fields of a record, not by a version flag (docs/routing-import.md has the fields):
  vLLM 0.20.x: `routed_experts` [seq_len, layers, k] from position 0, numpy offline or JSON lists;
  vLLM 0.21: `prompt_routed_experts` [prompt_len, L, k] + the choice's `routed_experts` [gen_len, L, k], int16
  lists, -1 rows for prefix-cached positions, `routed_experts=None` for a preempted request;
  vLLM >= 0.22: `routed_experts` as one base64 `.npy` buffer [N-1, L, k], prompt and generation merged;
  SGLang: `meta_info.routed_experts` (`sgl_ext.routed_experts` on OpenAI-style responses), base64 int32
  flattened [rows, layers, k] covering positions [routed_experts_start_len, N-1).
- The layer axis may hold every transformer layer (vLLM 0.20.x) or only the MoE layers. With every layer, the
  MoE layers are selected and each dense layer's slice must be a placeholder (all 0 or all -1), so a placeholder
  never becomes expert 0 and a wrong --model is caught instead of read as routing. Inside an MoE layer an all-zero
  row of k > 1 slots is a placeholder too (k distinct experts are chosen, so it is no routing): -1.
- The last token of a request is never fed to the model (nothing follows it), so a format with N-1 rows leaves it
  at -1 ("last_token"). Weights, gate scores, latents and next-token statistics are not returned by any engine.
- Every malformed input is a `RoutingImportError` (a ValueError) naming file, line and field.
Shape legend: N tokens of the request, R rows the engine returned, A all transformer layers, L MoE layers, k top-k.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.trace.schema import Layout

NPY_MAGIC = b"\x93NUMPY"
# why a position holds -1, in the order they are counted
REASONS = ("marked", "null", "skipped", "last_token")
# marked: the engine's array says -1 (vLLM 0.21 prefix-cache hits) or holds an all-zero placeholder row;
# null: the field is null (a preempted vLLM request); skipped: before SGLang's routed_experts_start_len;
# last_token: past the rows returned (the final token is never forwarded)


class RoutingImportError(ValueError):
    """An engine's output that does not fit the request or the model; the message names file, line and field."""


@dataclass(frozen=True)
class Where:
    """Where a record came from, so every error reads `FILE:LINE: FIELD: problem`."""

    file: str = "<input>"
    line: int = 0

    def error(self, name: str, problem: str) -> RoutingImportError:
        return RoutingImportError(f"{self.file}:{self.line}: {name}: {problem}")


@dataclass(frozen=True)
class RequestRouting:
    """One request in normal form."""

    token_ids: np.ndarray  # [N] int32: prompt, then generated
    expert_ids: np.ndarray  # [N, L, k] int16, -1 where not captured
    uncaptured: dict[str, int] = field(default_factory=dict)  # positions holding any -1, by reason (REASONS)

    @property
    def n_uncaptured(self) -> int:
        return sum(self.uncaptured.values())


# ---------------------------------------------------------------------- decoding one field
def decode_routed_experts(value: Any, where: Where, name: str) -> np.ndarray | None:
    """A routing field as an integer array: numpy (offline outputs), nested JSON lists (vLLM 0.20 / 0.21 over HTTP)
    or a base64 `.npy` buffer (vLLM >= 0.22); None stays None (a preempted request)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _decode_npy(_b64(value, where, name), where, name)
    if isinstance(value, list) and not value:
        return np.empty((0, 0, 0), dtype=np.int64)  # no rows
    try:
        arr = np.asarray(value)
    except ValueError:
        raise where.error(name, "nested lists of unequal lengths, expected [tokens, layers, top_k]") from None
    if arr.dtype.kind not in "iu":
        raise where.error(name, f"holds {arr.dtype} values, expected integer expert ids")
    return arr


def decode_sglang_routed_experts(value: Any, where: Where, name: str) -> np.ndarray:
    """SGLang's base64 buffer of little-endian int32 -> the flat [R * layers * k] ids."""
    if not isinstance(value, str):
        raise where.error(name, f"is {type(value).__name__}, expected SGLang's base64 int32 string")
    raw = _b64(value, where, name)
    if len(raw) % 4:
        raise where.error(name, f"decodes to {len(raw)} bytes, not a whole number of int32 values")
    return np.frombuffer(raw, dtype="<i4")


def _b64(value: str, where: Where, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise where.error(name, f"is not valid base64 ({e})") from None


def _decode_npy(raw: bytes, where: Where, name: str) -> np.ndarray:
    if not raw.startswith(NPY_MAGIC):
        raise where.error(name, "base64 that is not a .npy buffer (SGLang's raw int32 is read with --from sglang)")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise where.error(name, f"is a broken .npy buffer ({e})") from None
    if arr.dtype.kind not in "iu":
        raise where.error(name, f".npy buffer of {arr.dtype}, expected integer expert ids")
    return np.asarray(arr)


# ---------------------------------------------------------------------- normal form
def normalize_routed_experts(routed: np.ndarray, layout: Layout, where: Where, name: str) -> np.ndarray:
    """[R, A or L, k] engine ids -> int16 [R, L, k] over the layout's MoE layers, checked against the model.

    An all-layers axis (A = num_hidden_layers) keeps the MoE layers; its dense slices must be placeholders.
    All-zero rows of k > 1 slots become -1 (placeholders: top-k picks k distinct experts).
    """
    L, A, k, E = len(layout.layers), layout.n_layers, layout.top_k, layout.n_experts
    if routed.ndim != 3:
        raise where.error(name, f"has shape {routed.shape}, expected [tokens, layers, top_k]")
    if routed.shape[0] == 0:
        return np.empty((0, L, k), dtype=np.int16)
    _, layers, got_k = routed.shape
    if layers not in (L, A):
        raise where.error(name, f"has {layers} layers; the model has {A} layers (num_hidden_layers), {L} of them MoE")
    if got_k != k:
        raise where.error(name, f"has top_k {got_k}; the model routes each token to {k} experts")
    if layers == A and A != L:
        _check_placeholders(routed, layout, where, name)
        routed = routed[:, list(layout.layers), :]  # [R, L, k]
    bad = np.argwhere((routed < -1) | (routed >= E))
    if len(bad):
        t, layer, slot = (int(i) for i in bad[0])
        raise where.error(name, f"expert id {int(routed[t, layer, slot])} at token {t}, MoE layer "
                                f"{layout.layers[layer]}, slot {slot}: the model has {E} routed experts "
                                f"(0..{E - 1}, -1 = not captured); {len(bad)} such ids")
    out = routed.astype(np.int16)  # [R, L, k]
    if k > 1:
        out[(out == 0).all(axis=2)] = -1  # an all-zero row is a placeholder, never k picks of expert 0
    return out


def _check_placeholders(routed: np.ndarray, layout: Layout, where: Where, name: str) -> None:
    """Every dense layer of an all-layers axis [R, A, k] is all 0 or all -1: else the layout is not the model's."""
    dense = [i for i in range(layout.n_layers) if i not in set(layout.layers)]
    for i in dense:
        s = routed[:, i, :]  # [R, k]
        if not ((s == 0).all() or (s == -1).all()):
            raise where.error(name, f"layer {i} is dense in this model but holds expert ids; is --model / --config "
                                    "the model the engine served?")


def _place(n_tokens: int, L: int, k: int) -> np.ndarray:
    return np.full((n_tokens, L, k), -1, dtype=np.int16)  # [N, L, k]


def _count(counts: dict[str, int], reason: str, n: int) -> None:
    if n:
        counts[reason] = counts.get(reason, 0) + n


def _marked(rows: np.ndarray) -> int:
    """Positions of [R, L, k] that hold any -1."""
    return int((rows < 0).any(axis=(1, 2)).sum()) if rows.size else 0


def _merged(routed: np.ndarray | None, token_ids: np.ndarray, start: int, layout: Layout, where: Where,
            name: str, rows_for: tuple[int, ...]) -> RequestRouting:
    """Rows covering positions start.. of the whole request: R must be one of `rows_for` (counts of tokens)."""
    N, L, k = len(token_ids), len(layout.layers), layout.top_k
    out = _place(N, L, k)
    counts: dict[str, int] = {}
    if routed is None:
        _count(counts, "null", N)
        return RequestRouting(token_ids, out, counts)
    rows = normalize_routed_experts(routed, layout, where, name)  # [R, L, k]
    R = len(rows)
    if R not in rows_for:
        raise where.error(name, f"has {R} token rows; the {N} token ids it covers call for "
                                f"{' or '.join(str(r) for r in sorted(set(rows_for)))}")
    out[start:start + R] = rows
    _count(counts, "skipped", start)
    _count(counts, "marked", _marked(rows))
    _count(counts, "last_token", N - start - R)
    return RequestRouting(token_ids, out, counts)


# ---------------------------------------------------------------------- records
def vllm_request_routing(record: Mapping[str, Any], layout: Layout, where: Where, *, choice: int = 0,
                         vocab_size: int | None = None) -> RequestRouting:
    """One vLLM request (offline `RequestOutput` or an HTTP response, as JSON) in normal form.

    Split form (`prompt_routed_experts` present, 0.21): prompt rows, then the choice's generated rows (gen_len or
    gen_len - 1 of them). Merged form (0.20.x arrays, >= 0.22 base64 .npy): rows from position 0, N or N - 1.
    """
    pick, pname = _choice(record, choice, where)
    prompt = _ids(_first_field(("prompt_token_ids", record), (f"{pname}prompt_token_ids", pick)), where,
                  "prompt_token_ids", vocab_size, required=True)
    gen = _ids(_first_field((f"{pname}token_ids", pick if pname else {}), ("output_token_ids", record)), where,
               f"{pname}token_ids", vocab_size, required=False)
    token_ids = np.concatenate([prompt, gen]).astype(np.int32)  # [N]
    gname, graw = _first_field((f"{pname}routed_experts", pick), ("routed_experts", record))
    if "prompt_routed_experts" not in record:
        if gname is None:
            raise where.error(f"{pname}routed_experts", "missing: no routing in this record (was the server "
                                                        "started with --enable-return-routed-experts?)")
        N = len(token_ids)
        return _merged(decode_routed_experts(graw, where, gname), token_ids, 0, layout, where, gname, (N, N - 1))
    head = _merged(decode_routed_experts(record["prompt_routed_experts"], where, "prompt_routed_experts"),
                   prompt, 0, layout, where, "prompt_routed_experts", (len(prompt),))
    gname = gname or f"{pname}routed_experts"
    tail = _merged(decode_routed_experts(graw, where, gname), gen, 0, layout, where, gname,
                   (len(gen), max(len(gen) - 1, 0)))
    counts = dict(head.uncaptured)
    for reason, n in tail.uncaptured.items():
        _count(counts, reason, n)
    return RequestRouting(token_ids, np.concatenate([head.expert_ids, tail.expert_ids]), counts)


def sglang_request_routing(record: Mapping[str, Any], layout: Layout, where: Where, *, choice: int = 0,
                           vocab_size: int | None = None) -> RequestRouting:
    """One SGLang request (native /generate response with the `input_ids` sent, or an OpenAI-style one) in normal
    form: base64 int32 rows for positions [routed_experts_start_len, N - 1), of num_layers = A or L layers."""
    pick, pname = _choice(record, choice, where)
    prompt = _ids(_first_field(("input_ids", record), ("prompt_token_ids", record)), where, "input_ids",
                  vocab_size, required=True)
    gen = _ids(_first_field(("output_ids", record), (f"{pname}token_ids", pick if pname else {})), where,
               "output_ids", vocab_size, required=False)
    token_ids = np.concatenate([prompt, gen]).astype(np.int32)  # [N]
    holder_name, holder = _first_field(("meta_info", record), (f"{pname}sgl_ext", pick), ("sgl_ext", record))
    if not isinstance(holder, Mapping) or "routed_experts" not in holder:
        raise where.error(f"{holder_name or 'meta_info'}.routed_experts",
                          "missing: no routing in this record (server flag --enable-return-routed-experts and "
                          "request field return_routed_experts: true?)")
    name = f"{holder_name}.routed_experts"
    N, k = len(token_ids), layout.top_k
    start = holder.get("routed_experts_start_len", 0) or 0
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= max(N - 1, 0):
        raise where.error(f"{holder_name}.routed_experts_start_len",
                          f"{start!r} is not a position of the request's {N} tokens")
    rows = max(N - 1 - start, 0)
    flat = decode_sglang_routed_experts(holder["routed_experts"], where, name)  # [R * layers * k]
    if (rows == 0 and flat.size) or (rows and flat.size % (rows * k)) or (rows and not flat.size):
        raise where.error(name, f"holds {flat.size} ids, not {rows} token rows (the request's {N} token ids, "
                                f"positions {start}..{N - 2}) of layers x top_k {k}")
    routed = flat.reshape(rows, -1, k) if rows else np.empty((0, 0, 0), dtype=np.int32)  # [R, A or L, k]
    return _merged(routed, token_ids, start, layout, where, name, (rows,))


IMPORTERS = {"vllm": vllm_request_routing, "sglang": sglang_request_routing}


def _choice(record: Mapping[str, Any], choice: int, where: Where) -> tuple[Mapping[str, Any], str]:
    """The chosen completion (`outputs` offline, `choices` over HTTP) and its field-path prefix; the record itself
    and "" when it has neither (a record assembled by hand)."""
    for key in ("outputs", "choices"):
        if key in record:
            items = record[key]
            if not isinstance(items, list) or not 0 <= choice < len(items) or not isinstance(items[choice], Mapping):
                raise where.error(key, f"has no completion {choice} (--choice)")
            return items[choice], f"{key}[{choice}]."
    return record, ""


def _first_field(*candidates: tuple[str, Mapping[str, Any]]) -> tuple[str | None, Any]:
    """(name, value) of the first candidate whose key (the name's last part) is present."""
    for name, holder in candidates:
        key = name.rsplit(".", 1)[-1]
        if isinstance(holder, Mapping) and key in holder:
            return name, holder[key]
    return None, None


def _ids(found: tuple[str | None, Any], where: Where, default_name: str, vocab_size: int | None,
         required: bool) -> np.ndarray:
    """Token ids of a field: a list of ints in 0..vocab_size-1."""
    name, value = found
    if name is None:
        if required:
            raise where.error(default_name, "missing: the request's token ids are needed to place its routing")
        return np.empty(0, dtype=np.int64)
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise where.error(name, "expected a list of integer token ids")
    ids = np.asarray(value, dtype=np.int64)
    hi = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
    bad = np.nonzero((ids < 0) | (ids >= hi))[0]
    if len(bad):
        raise where.error(name, f"token id {int(ids[bad[0]])} at {int(bad[0])} is outside the vocabulary (0..{hi - 1})")
    return ids


# ---------------------------------------------------------------------- files
def iter_jsonl_routing(path: Path, source: str, layout: Layout, *, choice: int = 0,
                       vocab_size: int | None = None) -> Iterator[RequestRouting]:
    """Each non-blank line of a JSONL file (one captured request per line) in normal form, read line by line."""
    if source not in IMPORTERS:
        raise ValueError(f"--from {source!r}: expected one of {sorted(IMPORTERS)}")
    importer = IMPORTERS[source]
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = Where(str(path), lineno)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise where.error("line", f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise where.error("line", f"is a JSON {type(record).__name__}, expected an object (one request)")
            del line
            result = importer(record, layout, where, choice=choice, vocab_size=vocab_size)
            if len(result.token_ids) == 0:
                raise where.error("prompt_token_ids", "empty: a request has at least one token")
            yield result
