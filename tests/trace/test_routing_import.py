"""Routing returned by vLLM / SGLang, imported into a trace store: every released format, built from a real native
trace of the bundled model, reads back as that trace's expert_ids with exactly the uncaptured positions at -1."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from trace_helpers import corpus, in_memory

from workbench.analysis import expert_load
from workbench.cli import main
from workbench.trace import (
    RoutingImportError,
    iter_jsonl_routing,
    open_trace,
    select,
    sglang_request_routing,
    vllm_request_routing,
)
from workbench.trace.routing_import import Where
from workbench.trace.schema import Layout

TEXTS = corpus(8, seed=5)
Request = tuple[list[int], np.ndarray]  # token ids [N], native expert_ids [N, L, k]
# a format: (requests, layout) -> (one JSON record per request, mask [T] of the positions it leaves uncaptured)
Format = Callable[[list[Request], Layout], tuple[list[dict], np.ndarray]]


@pytest.fixture(scope="module")
def native(loaded):
    return in_memory(loaded, TEXTS)


@pytest.fixture(scope="module")
def layout(loaded) -> Layout:
    return select(loaded.model, ["expert_ids"]).layout


def requests_of(ds) -> list[Request]:
    seq, ids, experts = ds.seq.values, ds.token_id.values, ds.expert_ids.values
    return [(ids[seq == s].tolist(), experts[seq == s]) for s in np.unique(seq)]


def npy_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


def int32_b64(arr: np.ndarray) -> str:
    return base64.b64encode(arr.astype("<i4").tobytes()).decode()


def all_layers(ids: np.ndarray, layout: Layout, fill: int = 0) -> np.ndarray:
    """[R, L, k] -> [R, A, k] with every dense layer a `fill` placeholder slice (vLLM 0.20.x)."""
    out = np.full((len(ids), layout.n_layers, layout.top_k), fill, dtype=ids.dtype)
    out[:, list(layout.layers)] = ids
    return out


def split_point(n: int) -> int:
    return max(1, n // 2)


# ---------------------------------------------------------------------- the formats, as the engines return them
def vllm_split(reqs: list[Request], layout: Layout) -> tuple[list[dict], np.ndarray]:
    """vLLM 0.21 over HTTP: int16 JSON lists, prefix-cached prompt rows -1 (request 1), a preempted request
    (request 2: routed_experts null), full generation rows otherwise."""
    records, masks = [], []
    for i, (toks, ids) in enumerate(reqs):
        p = split_point(len(toks))
        prompt_rows, gen_rows = ids[:p].copy(), ids[p:].copy()
        mask = np.zeros(len(toks), bool)
        if i == 1:
            prompt_rows[: p // 2 + 1] = -1  # prefix-cache hits
            mask[: p // 2 + 1] = True
        gen: list | None = gen_rows.tolist()
        if i == 2:
            gen = None  # preempted
            mask[p:] = True
        records.append({"prompt_token_ids": toks[:p], "prompt_routed_experts": prompt_rows.tolist(),
                        "choices": [{"index": 0, "token_ids": toks[p:], "routed_experts": gen}]})
        masks.append(mask)
    return records, np.concatenate(masks)


def vllm_merged_npy(reqs: list[Request], layout: Layout) -> tuple[list[dict], np.ndarray]:
    """vLLM >= 0.22: one base64 .npy buffer (N-1, L, k) of prompt and generation; the last token has none."""
    records, masks = [], []
    for toks, ids in reqs:
        p = split_point(len(toks))
        records.append({"prompt_token_ids": toks[:p],
                        "choices": [{"token_ids": toks[p:], "routed_experts": npy_b64(ids[:-1].astype(np.int16))}]})
        mask = np.zeros(len(toks), bool)
        mask[-1] = True
        masks.append(mask)
    return records, np.concatenate(masks)


def vllm_all_layers(reqs: list[Request], layout: Layout) -> tuple[list[dict], np.ndarray]:
    """vLLM 0.20.x offline outputs saved as JSON: every transformer layer, dense ones as all-zero slices, from
    position 0 to N-2; request 0 also has a position left all zero (a placeholder, never expert 0)."""
    records, masks = [], []
    for i, (toks, ids) in enumerate(reqs):
        rows = all_layers(ids[:-1], layout)
        mask = np.zeros(len(toks), bool)
        mask[-1] = True
        if i == 0:
            rows[1] = 0
            mask[1] = True
        p = split_point(len(toks))
        records.append({"request_id": str(i), "prompt_token_ids": toks[:p],
                        "outputs": [{"index": 0, "token_ids": toks[p:], "routed_experts": rows.tolist()}]})
        masks.append(mask)
    return records, np.concatenate(masks)


def sglang(reqs: list[Request], layout: Layout) -> tuple[list[dict], np.ndarray]:
    """SGLang: base64 int32 rows for [routed_experts_start_len, N-1); the /generate form with meta_info (every
    layer, dense ones -1) and, for odd requests, the OpenAI-style form with sgl_ext (MoE layers only)."""
    records, masks = [], []
    for i, (toks, ids) in enumerate(reqs):
        p = split_point(len(toks))
        start = min(i % 3, len(toks) - 1)
        mask = np.zeros(len(toks), bool)
        mask[:start] = True
        mask[-1] = True
        if i % 2:
            records.append({"input_ids": toks[:p], "output_ids": toks[p:],
                            "choices": [{"index": 0, "sgl_ext": {"routed_experts": int32_b64(ids[start:-1]),
                                                                 "routed_experts_start_len": start}}]})
        else:
            rows = all_layers(ids[start:-1], layout, fill=-1)
            records.append({"input_ids": toks[:p], "output_ids": toks[p:], "text": "...",
                            "meta_info": {"id": str(i), "routed_experts": int32_b64(rows),
                                          "routed_experts_start_len": start}})
        masks.append(mask)
    return records, np.concatenate(masks)


FORMATS: dict[str, tuple[str, Format]] = {
    "vllm-0.21-split": ("vllm", vllm_split), "vllm-0.22-npy": ("vllm", vllm_merged_npy),
    "vllm-0.20-all-layers": ("vllm", vllm_all_layers), "sglang-start-len": ("sglang", sglang),
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def masked(native, mask: np.ndarray) -> np.ndarray:
    ids = native.expert_ids.values.copy()  # [T, L, k]
    ids[mask] = -1
    return ids


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_imports_as_the_native_trace_with_uncaptured_at_minus_one(fmt, native, layout, loaded, tmp_path,
                                                                             capsys):
    source, build = FORMATS[fmt]
    records, mask = build(requests_of(native), layout)
    assert 0 < mask.sum() < len(mask)
    src = write_jsonl(tmp_path / "requests.jsonl", records)
    out = tmp_path / "imported.zarr"
    rc = main(["import-routing", "--from", source, "--input", str(src), "--out", str(out), "--model", "default-v3",
               "--source-version", "test-1", "--no-progress", "--chunk-tokens", "16"])
    assert rc == 0, capsys.readouterr().err
    assert f"{int(mask.sum())} positions" in capsys.readouterr().out
    ds = open_trace(out)
    want = masked(native, mask)
    got = ds.expert_ids.values
    np.testing.assert_array_equal(got, want)
    assert ((got == -1).all(axis=(1, 2)) == mask).all()  # exactly those positions, each wholly
    np.testing.assert_array_equal(ds.token_id.values, native.token_id.values)
    np.testing.assert_array_equal(ds.seq.values, native.seq.values)
    np.testing.assert_array_equal(ds.doc.values, native.seq.values)
    np.testing.assert_array_equal(ds.pos.values, native.pos.values)
    assert [str(t) for t in ds.text.values] == [str(t) for t in native.text.values]
    assert np.isnan(ds.logprob.values).all() and np.isnan(ds.loss.values).all() and (ds.pred_id.values == -1).all()
    assert ds.attrs["source"] == source and ds.attrs["source_version"] == "test-1"
    assert ds.attrs["uncaptured"] == int(mask.sum()) and ds.attrs["complete"]
    assert sum(json.loads(ds.attrs["uncaptured_by_reason"]).values()) == int(mask.sum())
    assert ds.attrs["model_config"] == native.attrs["model_config"]
    assert Layout.from_json(json.loads(ds.attrs["layout"])) == layout
    restricted = native.assign(expert_ids=(native.expert_ids.dims, want))
    load = expert_load(ds).values
    np.testing.assert_array_equal(load, expert_load(restricted).values)
    full = expert_load(native).values
    assert load.sum() == full.sum() - int(mask.sum()) * len(layout.layers) * layout.top_k


def test_reasons_are_counted_per_position(native, layout):
    reqs = requests_of(native)
    records, _ = vllm_split(reqs, layout)
    where = Where("r.jsonl", 2)
    cached = vllm_request_routing(records[1], layout, where)
    assert cached.uncaptured == {"marked": split_point(len(reqs[1][0])) // 2 + 1}
    preempted = vllm_request_routing(records[2], layout, where)
    assert preempted.uncaptured == {"null": len(reqs[2][0]) - split_point(len(reqs[2][0]))}
    records, _ = sglang(reqs, layout)
    skipped = sglang_request_routing(records[2], layout, where)
    assert skipped.uncaptured == {"skipped": 2, "last_token": 1}


def test_a_dense_placeholder_never_becomes_expert_zero(native, layout):
    toks, ids = requests_of(native)[0]
    rows = all_layers(ids, layout)  # [N, A, k], the dense layer all zero
    rec = {"prompt_token_ids": toks, "outputs": [{"token_ids": [], "routed_experts": rows.tolist()}]}
    got = vllm_request_routing(rec, layout, Where("r.jsonl", 1))
    np.testing.assert_array_equal(got.expert_ids, ids)
    assert got.n_uncaptured == 0


# ---------------------------------------------------------------------- malformed input
def _good(reqs: list[Request]) -> dict:
    toks, ids = reqs[0]
    return {"prompt_token_ids": toks[:3], "choices": [{"token_ids": toks[3:], "routed_experts": ids[:-1].tolist()}]}


def _routed(value) -> Callable[[dict], None]:
    def edit(rec: dict) -> None:
        rec["choices"][0]["routed_experts"] = value(rec) if callable(value) else value
    return edit


def _ids(rec: dict) -> np.ndarray:
    return np.asarray(rec["choices"][0]["routed_experts"])


MALFORMED = {
    "wrong shape": (_routed(lambda r: _ids(r)[:, 0].tolist()), r"choices\[0\]\.routed_experts: has shape \(\d+, 4\), "
                                                                r"expected \[tokens, layers, top_k\]"),
    "layer count": (_routed(lambda r: _ids(r)[:, :2].tolist()),
                    r"choices\[0\]\.routed_experts: has 2 layers; the model has 4 layers \(num_hidden_layers\), 3 of "
                    r"them MoE"),
    "top_k": (_routed(lambda r: _ids(r)[:, :, :3].tolist()),
              r"choices\[0\]\.routed_experts: has top_k 3; the model routes each token to 4 experts"),
    "expert id": (_routed(lambda r: np.where(np.arange(_ids(r).size).reshape(_ids(r).shape) == 5, 16, _ids(r)).tolist()),
                  r"choices\[0\]\.routed_experts: expert id 16 at token 0, MoE layer 2, slot 1: the model has 16 "
                  r"routed experts"),
    "negative id": (_routed(lambda r: np.where(_ids(r) == _ids(r)[0, 0, 0], -3, _ids(r)).tolist()),
                    r"choices\[0\]\.routed_experts: expert id -3 at token 0"),
    "bad base64": (_routed("not*base64!"), r"choices\[0\]\.routed_experts: is not valid base64"),
    "not npy": (_routed(lambda r: int32_b64(_ids(r))), r"choices\[0\]\.routed_experts: base64 that is not a \.npy buffer"),
    "token count": (_routed(lambda r: _ids(r)[:-2].tolist()),
                    r"choices\[0\]\.routed_experts: has \d+ token rows; the \d+ token ids it covers call for \d+ or \d+"),
    "ragged": (_routed(lambda r: [*_ids(r)[:-1].tolist(), [[1]]]),
               r"choices\[0\]\.routed_experts: nested lists of unequal lengths"),
    "floats": (_routed(lambda r: (_ids(r) + 0.5).tolist()), r"choices\[0\]\.routed_experts: holds float64 values"),
    "no prompt ids": (lambda rec: rec.pop("prompt_token_ids"), r"prompt_token_ids: missing"),
    "token id": (lambda rec: rec["prompt_token_ids"].__setitem__(0, 10**6),
                 r"prompt_token_ids: token id 1000000 at 0 is outside the vocabulary \(0\.\.2047\)"),
    "no routing": (lambda rec: rec["choices"][0].pop("routed_experts"), r"choices\[0\]\.routed_experts: missing"),
    "dense layer with ids": (_routed(lambda r: np.concatenate([_ids(r)[:, :1], _ids(r)], axis=1).tolist()),
                             r"choices\[0\]\.routed_experts: layer 0 is dense in this model but holds expert ids"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_vllm_input_names_file_line_and_field(case, native, layout, tmp_path):
    edit, message = MALFORMED[case]
    good = _good(requests_of(native))
    bad = json.loads(json.dumps(good))
    edit(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(RoutingImportError, match=rf"^{re.escape(str(path))}:2: {message}"):
        list(iter_jsonl_routing(path, "vllm", layout, vocab_size=2048))


def test_malformed_sglang_and_json_lines(native, layout, tmp_path):
    toks, ids = requests_of(native)[0]
    good = {"input_ids": toks[:2], "output_ids": toks[2:], "meta_info": {"routed_experts": int32_b64(ids[:-1])}}
    cases = [
        ({**good, "meta_info": {"routed_experts": int32_b64(ids[:-2])}},
         r"meta_info\.routed_experts: holds \d+ ids, not \d+ token rows"),
        ({**good, "meta_info": {"routed_experts": "abc"}}, r"meta_info\.routed_experts: is not valid base64"),
        ({**good, "meta_info": {"routed_experts": base64.b64encode(b"12345").decode()}},
         r"meta_info\.routed_experts: decodes to 5 bytes"),
        ({**good, "meta_info": {"routed_experts": int32_b64(ids[1:-1]), "routed_experts_start_len": 99}},
         r"meta_info\.routed_experts_start_len: 99 is not a position"),
        ({**good, "meta_info": {}}, r"meta_info\.routed_experts: missing"),
        ({"output_ids": toks, "meta_info": good["meta_info"]}, r"input_ids: missing"),
    ]
    for record, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
        with pytest.raises(RoutingImportError, match=rf"^{re.escape(str(path))}:2: {message}"):
            list(iter_jsonl_routing(path, "sglang", layout))
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(RoutingImportError, match=rf"{re.escape(str(path))}:3: line: not valid JSON"):
        list(iter_jsonl_routing(path, "sglang", layout))
    path.write_text("[1, 2]\n")
    with pytest.raises(RoutingImportError, match=r":1: line: is a JSON list, expected an object"):
        list(iter_jsonl_routing(path, "sglang", layout))


# ---------------------------------------------------------------------- the command
def test_cli_fails_above_max_uncaptured_and_removes_the_store(native, layout, tmp_path, capsys):
    reqs = requests_of(native)
    records = [{"prompt_token_ids": toks, "outputs": [{"token_ids": [], "routed_experts": None}]}
               for toks, _ in reqs[:3]]
    records.append({"prompt_token_ids": reqs[3][0], "outputs": [{"token_ids": [], "routed_experts": reqs[3][1].tolist()}]})
    src = write_jsonl(tmp_path / "preempted.jsonl", records)
    out = tmp_path / "s.zarr"
    args = ["import-routing", "--from", "vllm", "--input", str(src), "--out", str(out), "--model", "default-v3",
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    n = sum(len(t) for t, _ in reqs[:3])
    assert f"{n} of {n + len(reqs[3][0])} positions" in err and "null" in err and "--max-uncaptured 0.5" in err
    assert not out.exists()
    assert main([*args, "--max-uncaptured", "1"]) == 0
    ds = open_trace(out)
    assert ds.attrs["uncaptured"] == n and json.loads(ds.attrs["uncaptured_by_reason"])["null"] == n
    np.testing.assert_array_equal(ds.expert_ids.values[n:], reqs[3][1])


def test_cli_malformed_line_is_one_error_and_leaves_no_store(native, tmp_path, capsys):
    good = _good(requests_of(native))
    src = write_jsonl(tmp_path / "r.jsonl", [good, {**good, "prompt_token_ids": "abc"}])
    out = tmp_path / "s.zarr"
    rc = main(["import-routing", "--from", "vllm", "--input", str(src), "--out", str(out), "--model", "default-v3",
               "--no-progress"])
    assert rc == 2
    assert f"{src}:2: prompt_token_ids: expected a list of integer token ids" in capsys.readouterr().err
    assert not out.exists()


def test_cli_with_a_config_json_alone_and_a_chosen_completion(native, layout, loaded, tmp_path, capsys):
    (tmp_path / "served").mkdir()
    config = tmp_path / "served" / "config.json"
    loaded.model.config.to_json(config)
    reqs = requests_of(native)
    records = []
    for toks, ids in reqs:
        other = np.roll(ids, 1, axis=2)
        records.append({"prompt_token_ids": toks[:1],
                        "outputs": [{"token_ids": toks[1:], "routed_experts": other[:-1].tolist()},
                                    {"token_ids": toks[1:], "routed_experts": ids[:-1].tolist()}]})
    src = write_jsonl(tmp_path / "r.jsonl", records)
    out = tmp_path / "s.zarr"
    rc = main(["import-routing", "--from", "vllm", "--input", str(src), "--out", str(out), "--config", str(config),
               "--choice", "1", "--revision", "deepseek-ai/DeepSeek-V3@abc123"])
    assert rc == 0, capsys.readouterr().err
    ds = open_trace(out)
    last = np.r_[native.seq.values[1:] != native.seq.values[:-1], True]  # [T] each request's final token
    np.testing.assert_array_equal(ds.expert_ids.values, masked(native, last))
    assert ds.attrs["checkpoint"] == "deepseek-ai/DeepSeek-V3@abc123" and "source_version" not in ds.attrs
    assert Layout.from_json(json.loads(ds.attrs["layout"])) == layout
    assert (ds.text.values == "").all()  # no tokenizer.json beside the config
    assert main(["import-routing", "--from", "vllm", "--input", str(src), "--out", str(tmp_path / "t.zarr"),
                 "--config", str(config), "--choice", "2", "--no-progress"]) == 2
    assert "outputs: has no completion 2 (--choice)" in capsys.readouterr().err


def test_an_import_into_s3_reads_back_as_the_same_import_on_disk(native, layout, tmp_path, s3):
    records, mask = vllm_split(requests_of(native), layout)
    src = write_jsonl(tmp_path / "requests.jsonl", records)
    url = s3.url("import")
    flags = ["import-routing", "--from", "vllm", "--input", str(src), "--model", "default-v3", "--no-progress",
             "--chunk-tokens", "16"]
    assert main([*flags, "--out", str(tmp_path / "disk.zarr")]) == 0
    assert main([*flags, "--out", url, "--storage-options", json.dumps(s3.options)]) == 0
    remote = open_trace(url, storage_options=s3.options)
    np.testing.assert_array_equal(remote.expert_ids.values, open_trace(tmp_path / "disk.zarr").expert_ids.values)
    assert remote.attrs["uncaptured"] == int(mask.sum())
