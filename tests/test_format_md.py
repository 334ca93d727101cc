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


def spec_read_arrays(folder, manifest, layout=None):
    if manifest["backend"] == "zarr":
        g = zarr.open_group(str(Path(folder) / "data.zarr"), mode="r")
        return {name: g[name][...] for name in g.array_keys()}
    if layout != "samples":
        table = pa.ipc.open_stream(pa.memory_map(str(Path(folder) / "data.arrow"))).read_all()
        return {name: table[name].chunk(0).values.to_numpy(zero_copy_only=False) for name in table.column_names}
    table = pa.ipc.open_file(pa.memory_map(str(Path(folder) / "data.arrow"))).read_all()
    cols = {name: table[name].combine_chunks() for name in table.column_names}
    scalars = ("sample_index", "prompt_length")  # one value per sample
    out = {name: c.values.to_numpy(zero_copy_only=False) for name, c in cols.items() if name not in scalars}
    out.update({name: cols[name].to_numpy() for name in scalars if name in cols})
    out["token_offsets"] = cols["input_ids"].offsets.to_numpy()
    if "text" in cols:
        out["text_offsets"] = cols["text"].offsets.to_numpy()
    out["position_offsets"] = rows = cols["topk_width"].offsets.to_numpy()
    for name, (bits, per_sample) in spec_packed(manifest["encoding"], out, rows).items():
        padded = -(-per_sample // 8) * 8
        values = spec_unpack(out[name], bits, int(padded.sum()))
        start = np.concatenate([[0], np.cumsum(padded)])
        keep = np.concatenate([values[a : a + n] for a, n in zip(start, per_sample)])
        out[name] = spec_pack(keep, bits)
    return out


def spec_packed(enc, arrays, rows):
    """{name: (bits, entries per sample)} of the bit-packed arrays of a samples-layout part."""
    per_sample = lambda widths: np.add.reduceat(np.append(widths.astype(np.int64), 0), rows[:-1]) * (np.diff(rows) > 0)
    out = {}
    for name in arrays:
        base = name.rsplit("_", 1)[0] if name[-1].isdigit() else name
        if base in ("topk_ids", "drawn_ids") and enc["ids"]["codec"] == "bitpack":
            bits = enc["ids"]["bits"]
        elif base in ("topk_logprobs", "drawn_logprobs") and enc["logprobs"]["codec"] == "power":
            bits = None if enc["logprobs"]["bits"] == 8 else enc["logprobs"]["bits"]
        elif base == "sketch_codes":
            bits = None if enc["sketch"]["bits"] == 8 else enc["sketch"]["bits"]
        else:
            continue
        if bits:
            widths = arrays["topk_width"] if base.startswith("topk") else arrays.get(f"drawn_width_{name[-1]}")
            n = np.diff(rows) * enc["sketch"]["rank"] if base == "sketch_codes" else per_sample(widths)
            out[name] = (bits, n)
    return out


def spec_pack(values, bits):
    stream = ((values.astype(np.int64)[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little")


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
    arrays = spec_read_arrays(folder, manifest)  # the sketch folder: one row, as Arrow caches before "layout"
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
        if enc.get("text"):  # the prompt's bytes, then the distilled text's
            a, b = arr["text_offsets"][i], arr["text_offsets"][i + 1]
            raw = arr["text"][a:b].tobytes()
            s["prompt_text"], s["text"] = raw[: arr["prompt_length"][i]], raw[arr["prompt_length"][i] :]
            s["text_end"] = arr["text_end"][t0:t1]
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
        yield from spec_samples_v2(manifest, spec_read_arrays(folder, manifest, manifest.get("layout")), t)


ENCODINGS = [
    {},
    {"logprob_dtype": "float32"},
    {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.9},
    {"ids": "bitpack", "logprob_dtype": "q5", "top_p": 0.6, "min_k": 0, "draws": 12},
    {"logprob_dtype": "float16", "top_p": 0.6, "draws": 12},
    {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.6, "draws": 12, "exact_draws": False},
    {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.5, "draws": 12, "sketch_rank": 5, "sketch_bits": 4},
    {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.5, "draws": 12, "text": True},
]


@pytest.mark.parametrize(
    "encoding",
    ENCODINGS,
    ids=["default", "float32", "bitpack-q8-topp", "q5-draws", "f16-draws", "counted-draws", "draws-sketch", "text"],
)
@pytest.mark.parametrize("backend", ["zarr", "arrow", "arrow-one-row-per-part"])
def test_reader_from_format_md_matches_open_cache(tmp_path, backend, encoding):
    layout = "part" if backend.endswith("part") else None
    write_cache(tmp_path / "c", backend[:5].strip("-"), 9, 4, temperatures=(1.0, 3.0), layout=layout, **encoding)
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
            if "text" in s:
                assert (s["prompt_text"], s["text"]) == (o["prompt_text"], o["text"])
                np.testing.assert_array_equal(s["text_end"], o["text_end"])
            for r, (ids, est) in enumerate(s.get("drawn", [])):
                np.testing.assert_array_equal(ids, o["drawn_ids"][r][o["drawn_ids"][r] >= 0])
                np.testing.assert_allclose(est, np.exp(o["drawn_logprobs"][r][: len(ids)]), rtol=1e-5)


def spec_one_sample(cache_dir, i, t=0):
    """Stored sample i from slices of its Zarr part, as FORMAT.md's "One sample without reading a whole part" says:
    only topk_width is read from the part's start."""
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    enc, p, j = manifest["encoding"], 0, i
    while j >= manifest["parts"][f"part-{p:06d}"]["counts"]["samples"]:
        j -= manifest["parts"][f"part-{p:06d}"]["counts"]["samples"]
        p += 1
    g = zarr.open_group(str(Path(cache_dir) / "parts" / f"part-{p:06d}" / "data.zarr"), mode="r")
    t0, t1 = g["token_offsets"][j : j + 2]
    r0, r1 = g["position_offsets"][j : j + 2]
    widths = g["topk_width"][:r1].astype(np.int64)
    o0, o1 = int(widths[:r0].sum()), int(widths.sum())
    bits = enc["ids"]["bits"]
    data = g["topk_ids"][o0 * bits // 8 : -(-o1 * bits // 8)]
    stream = np.unpackbits(np.asarray(data, np.uint8), bitorder="little")[o0 * bits % 8 :][: (o1 - o0) * bits]
    ids = (stream.reshape(-1, bits).astype(np.int64) << np.arange(bits)).sum(1)
    tail = g[f"tail_logmass_{t}"][r0:r1]
    lps = spec_logprobs(g[f"topk_logprobs_{t}"][o0:o1], enc["logprobs"], widths[r0:], tail)
    return g["input_ids"][t0:t1], np.split(ids, np.cumsum(widths[r0:])[:-1]), lps


def test_one_sample_reads_from_slices_of_a_zarr_part(tmp_path):
    write_cache(tmp_path / "c", "zarr", num_rows=11, part_size=4, ids="bitpack", logprob_dtype="q8", top_p=0.8)
    ours = storage.open_cache(tmp_path / "c")
    for i in range(len(ours)):
        input_ids, rows, lps = spec_one_sample(tmp_path / "c", i)
        o = ours[i]
        np.testing.assert_array_equal(input_ids, o["input_ids"])
        assert [r.tolist() for r in rows] == [r[r >= 0].tolist() for r in o["topk_ids"]]
        np.testing.assert_allclose(lps, o["topk_logprobs"][o["topk_ids"] >= 0], rtol=1e-5, atol=1e-6)
