"""A reader written from storage/FORMAT.md alone (json, hashlib, zarr, pyarrow; nothing of ours) agrees
with open_cache on every sample and checksum."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr

import storage
from synthetic import write_cache


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def spec_part_checksum(folder):
    files = sorted((p for p in Path(folder).rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    text = "".join(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_read_part(folder, backend, n_temps):
    if backend == "zarr":
        g = zarr.open_group(str(Path(folder) / "data.zarr"), mode="r")
        return {name: g[name][...] for name in g.array_keys()}
    table = pa.ipc.open_stream(pa.memory_map(str(Path(folder) / "data.arrow"))).read_all().combine_chunks()
    out = {"sample_index": table["sample_index"].to_numpy()}
    for name in table.column_names[1:]:
        col = table[name].chunk(0)
        values = col.values
        if pa.types.is_fixed_size_list(values.type):
            width = values.type.list_size
            values = values.values.to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            values = values.to_numpy(zero_copy_only=False)
        out[name] = values
        if name == "input_ids":
            out["token_offsets"] = col.offsets.to_numpy().astype(np.int64)
        if name == "topk_ids":
            out["position_offsets"] = col.offsets.to_numpy().astype(np.int64)
    return out


def spec_samples(cache_dir, t=0):
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    assert manifest["format"] == "distill-teacher-cache" and manifest["format_version"] == 1
    for p in range(manifest["num_parts"]):
        name = f"part-{p:06d}"
        folder = Path(cache_dir) / "parts" / name
        assert spec_part_checksum(folder) == manifest["parts"][name]["sha256"]
        arr = spec_read_part(folder, manifest["backend"], len(manifest["temperatures"]))
        assert str(arr["topk_ids"].dtype) == manifest["dtypes"]["topk_ids"]
        for i in range(len(arr["sample_index"])):
            t0, t1 = arr["token_offsets"][i], arr["token_offsets"][i + 1]
            r0, r1 = arr["position_offsets"][i], arr["position_offsets"][i + 1]
            yield {"sample_index": int(arr["sample_index"][i]), "input_ids": arr["input_ids"][t0:t1],
                   "loss_mask": arr["loss_mask"][t0:t1], "topk_ids": arr["topk_ids"][r0:r1],
                   "topk_logprobs": arr[f"topk_logprobs_{t}"][r0:r1], "tail_logmass": arr[f"tail_logmass_{t}"][r0:r1]}


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_reader_from_format_md_matches_open_cache(tmp_path, backend):
    write_cache(tmp_path / "c", backend, num_rows=9, part_size=4, temperatures=(1.0, 3.0))
    for t, temp in enumerate((1.0, 3.0)):
        ours = storage.open_cache(tmp_path / "c", temperature=temp)
        theirs = list(spec_samples(tmp_path / "c", t))
        assert len(theirs) == len(ours)
        for i, s in enumerate(theirs):
            o = ours[i]
            assert s["sample_index"] == o["sample_index"]
            for key in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logmass"):
                np.testing.assert_array_equal(s[key], o[key])
            assert s["loss_mask"].sum() == len(s["topk_ids"])
            mass = np.exp(s["topk_logprobs"].astype(np.float64)).sum(1) + np.exp(s["tail_logmass"].astype(np.float64))
            np.testing.assert_allclose(mass, 1, atol=5e-3)
