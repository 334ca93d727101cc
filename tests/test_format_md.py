"""A reader written from storage/FORMAT.md alone (json, hashlib, numpy, zarr, pyarrow; nothing of ours) agrees with
open_cache on every sample and checksum, for every encoding of version 2 and for version 1."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr
from synthetic import write_cache

import storage


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def spec_part_checksum(folder):
    files = sorted((p for p in Path(folder).rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    text = "".join(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_record_checksum(folder):
    """The same checksum from part.json alone (its own sha256 and the sha256s it records), after checking each file
    against its recorded sha256 and size."""
    record = json.loads((Path(folder) / "part.json").read_text())
    for rel, digest in record["files"].items():
        assert sha256_file(Path(folder) / rel) == digest and (Path(folder) / rel).stat().st_size == record["sizes"][rel]
    lines = {**record["files"], "part.json": sha256_file(Path(folder) / "part.json")}
    return hashlib.sha256("".join(f"{rel}\0{lines[rel]}\n" for rel in sorted(lines)).encode()).hexdigest()


def spec_read_arrays(folder, backend):
    if backend == "zarr":
        g = zarr.open_group(str(Path(folder) / "data.zarr"), mode="r")
        return {name: g[name][...] for name in g.array_keys()}
    table = pa.ipc.open_stream(pa.memory_map(str(Path(folder) / "data.arrow"))).read_all()
    return {name: table[name].chunk(0).values.to_numpy(zero_copy_only=False) for name in table.column_names}


def spec_unpack(data, bits, n):
    stream = np.unpackbits(np.asarray(data, np.uint8), bitorder="little")[: n * bits].reshape(n, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(1)


def spec_ids(data, codec, n):
    return spec_unpack(data, codec["bits"], n) if codec["codec"] == "bitpack" else data.astype(np.int64)


def spec_logprobs(data, codec, widths, tail):
    if codec["codec"] in ("float16", "float32"):
        return data.astype(np.float64)
    n, b, gamma = int(widths.sum()), codec["bits"], codec["gamma"]
    codes = data.astype(np.int64) if b == 8 else spec_unpack(data, b, n)
    x = gamma * np.log(np.maximum(codes, 0.5) / (2**b - 1))
    out, o = np.empty(n), 0
    for r, w in enumerate(widths):
        row = x[o : o + w]
        out[o : o + w] = row - np.log(np.exp(row).sum()) + np.log(1 - np.exp(float(tail[r])))
        o += w
    return out


def spec_drawn(data, enc, offsets, r, tail):
    codec = enc["logprobs"]
    if codec["codec"] in ("float16", "float32"):
        return data[offsets[r] : offsets[r + 1]].astype(np.float64)
    b = codec["bits"]
    codes = data.astype(np.int64) if b == 8 else spec_unpack(data, b, int(offsets[-1]))
    return float(tail[r]) + codec["gamma"] * np.log(codes[offsets[r] : offsets[r + 1]] / (2**b - 1))


def spec_sketch_coeffs(arr, sketch):
    rank, b = sketch["rank"], sketch["bits"]
    n = len(arr["sketch_scale"]) * rank
    codes = arr["sketch_codes"].astype(np.int64) if b == 8 else spec_unpack(arr["sketch_codes"], b, n)
    return (codes.reshape(-1, rank) - (2 ** (b - 1) - 1)) * arr["sketch_scale"].astype(np.float64)[:, None]


def spec_sketch(cache_dir, manifest):
    folder = Path(cache_dir) / "sketch"
    assert spec_part_checksum(folder) == spec_record_checksum(folder) == manifest["sketch"]["sha256"]
    arrays = spec_read_arrays(folder, manifest["backend"])
    r, v = manifest["encoding"]["sketch"]["rank"], manifest["vocab_size"]
    return arrays["basis"].reshape(r + 1, v)


def spec_samples_v2(manifest, arr, t):
    enc = manifest["encoding"]
    widths = arr["topk_width"].astype(np.int64)
    o = np.concatenate([[0], np.cumsum(widths)])
    tail = arr[f"tail_logmass_{t}"]
    ids = spec_ids(arr["topk_ids"], enc["ids"], int(o[-1]))
    lps = spec_logprobs(arr[f"topk_logprobs_{t}"], enc["logprobs"], widths, tail)
    for i in range(len(arr["sample_index"])):
        t0, t1 = arr["token_offsets"][i], arr["token_offsets"][i + 1]
        r0, r1 = arr["position_offsets"][i], arr["position_offsets"][i + 1]
        rows = [(ids[o[r] : o[r + 1]], lps[o[r] : o[r + 1]]) for r in range(r0, r1)]
        s = {
            "sample_index": int(arr["sample_index"][i]),
            "input_ids": arr["input_ids"][t0:t1],
            "loss_mask": arr["loss_mask"][t0:t1],
            "rows": rows,
            "tail_logmass": tail[r0:r1],
        }
        if enc["target_logprob"]:
            s["target_logprob"] = arr[f"target_logprob_{t}"][r0:r1]
        if enc.get("sketch"):
            s["sketch"] = spec_sketch_coeffs(arr, enc["sketch"])[r0:r1]
        if enc["draws"]:
            dw = arr[f"drawn_width_{t}"].astype(np.int64)
            do = np.concatenate([[0], np.cumsum(dw)])
            d_ids = spec_ids(arr[f"drawn_ids_{t}"], enc["ids"], int(do[-1]))
            if enc["draws"].get("values") == "logprobs":  # exact: log p_j, power codes relative to P_R
                s["drawn"] = [
                    (d_ids[do[r] : do[r + 1]], np.exp(spec_drawn(arr[f"drawn_logprobs_{t}"], enc, do, r, tail)))
                    for r in range(r0, r1)
                ]
            else:
                counts = arr[f"drawn_counts_{t}"]
                s["drawn"] = [
                    (d_ids[do[r] : do[r + 1]], np.exp(float(tail[r])) * counts[do[r] : do[r + 1]] / enc["draws"]["n"])
                    for r in range(r0, r1)
                ]
        yield s


def spec_samples(cache_dir, t=0):
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    assert manifest["format"] == "distill-teacher-cache" and manifest["format_version"] == 2
    for p in range(manifest["num_parts"]):
        name = f"part-{p:06d}"
        folder = Path(cache_dir) / "parts" / name
        assert spec_part_checksum(folder) == spec_record_checksum(folder) == manifest["parts"][name]["sha256"]
        yield from spec_samples_v2(manifest, spec_read_arrays(folder, manifest["backend"]), t)


ENCODINGS = [
    {},
    {"logprob_dtype": "float32"},
    {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.9},
    {"ids": "bitpack", "logprob_dtype": "q5", "top_p": 0.6, "min_k": 0, "draws": 12},
    {"logprob_dtype": "float16", "top_p": 0.6, "draws": 12},
    {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.6, "draws": 12, "exact_draws": False},
    {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.5, "draws": 12, "sketch_rank": 5, "sketch_bits": 4},
]


@pytest.mark.parametrize(
    "encoding",
    ENCODINGS,
    ids=["default", "float32", "bitpack-q8-topp", "q5-draws", "f16-draws", "counted-draws", "draws-sketch"],
)
@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_reader_from_format_md_matches_open_cache(tmp_path, backend, encoding):
    write_cache(tmp_path / "c", backend, num_rows=9, part_size=4, temperatures=(1.0, 3.0), **encoding)
    if encoding.get("sketch_rank"):
        manifest = json.loads((tmp_path / "c/manifest.json").read_text())
        np.testing.assert_array_equal(
            spec_sketch(tmp_path / "c", manifest), storage.open_cache(tmp_path / "c").sketch()["basis"]
        )
    for t, temp in enumerate((1.0, 3.0)):
        ours = storage.open_cache(tmp_path / "c", temperature=temp)
        theirs = list(spec_samples(tmp_path / "c", t))
        assert len(theirs) == len(ours)
        for i, s in enumerate(theirs):
            o = ours[i]
            assert s["sample_index"] == o["sample_index"]
            np.testing.assert_array_equal(s["input_ids"], o["input_ids"])
            np.testing.assert_array_equal(s["tail_logmass"], o["tail_logmass"])
            assert len(s["rows"]) == s["loss_mask"].sum() == len(o["topk_ids"])
            for r, (ids, lps) in enumerate(s["rows"]):
                np.testing.assert_array_equal(ids, o["topk_ids"][r][o["topk_ids"][r] >= 0])
                np.testing.assert_allclose(lps, o["topk_logprobs"][r][: len(ids)], rtol=1e-5, atol=1e-6)
                mass = np.exp(lps).sum() + np.exp(float(s["tail_logmass"][r]))
                assert abs(mass - 1) < 5e-3
            if "target_logprob" in s:
                np.testing.assert_array_equal(s["target_logprob"], o["target_logprob"])
            if "sketch" in s:
                np.testing.assert_allclose(s["sketch"], o["sketch_coeffs"], rtol=1e-6)
            for r, (ids, est) in enumerate(s.get("drawn", [])):
                np.testing.assert_array_equal(ids, o["drawn_ids"][r][o["drawn_ids"][r] >= 0])
                np.testing.assert_allclose(est, np.exp(o["drawn_logprobs"][r][: len(ids)]), rtol=1e-5)
