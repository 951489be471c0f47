"""Byte-level safetensors edge cases: what is a safetensors file is decided by its header, never by magic."""

from __future__ import annotations

import builtins
import io
import json
import pickle
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_klora.errors import LoraFileError
from lib_klora.loras import safetensors_header
from lib_klora.loras.lora_file import read_lora_file
from lib_klora.loras.safetensors_header import HEADER_LIMIT, pickle_refusal, read_safetensors

STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CANONICAL = "unet:down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _raw_file(
    entries: list[tuple[str, str, list[int], bytes]],
    metadata: dict[str, str] | None = None,
    header_length: int | None = None,
) -> bytes:
    """A safetensors file written by hand: (name, dtype, shape, bytes) entries, the header padded with
    spaces to exactly `header_length` bytes when given."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    if header_length is not None:
        assert header_length >= len(text)
        text += b" " * (header_length - len(text))
    return struct.pack("<Q", len(text)) + text + b"".join(e[3] for e in entries)


def _lora_entries(rank: int = 2, in_f: int = 8, out_f: int = 8) -> list[tuple[str, str, list[int], bytes]]:
    g = torch.Generator().manual_seed(0)
    down = torch.randn(rank, in_f, generator=g)
    up = torch.randn(out_f, rank, generator=g)
    return [
        (f"{STEM}.lora_down.weight", "F32", [rank, in_f], down.numpy().tobytes()),
        (f"{STEM}.lora_up.weight", "F32", [out_f, rank], up.numpy().tobytes()),
    ]


def _minimal_length() -> int:
    return len(_raw_file(_lora_entries())) - 8 - sum(len(e[3]) for e in _lora_entries())


@pytest.mark.parametrize("first_byte", range(256))
def test_every_first_byte_of_the_header_length_reads(tmp_path: Path, first_byte: int) -> None:
    """The issue's case: a header length whose low byte is 0x80 was taken for a pickle (1 file in 256)."""
    base = _minimal_length()
    length = ((base >> 8) + 1 << 8) | first_byte
    path = tmp_path / "padded.safetensors"
    path.write_bytes(_raw_file(_lora_entries(), header_length=length))
    assert path.read_bytes()[0] == first_byte
    with safe_open(str(path), "pt") as handle:  # the reference reader accepts it ...
        assert len(list(handle.keys())) == 2
    lora = read_lora_file(path)  # ... and so do we
    assert list(lora.modules) == [CANONICAL]


@pytest.mark.parametrize("length", [0x4B50, 0x0280, 0xE480, 0x034B50])
def test_header_lengths_that_spell_pickle_or_zip_magic(tmp_path: Path, length: int) -> None:
    """'PK' (0x4B50), 0x80 0x02 (pickle protocol 2) and the length seen live (0xE480) are plain lengths."""
    path = tmp_path / "magic.safetensors"
    path.write_bytes(_raw_file(_lora_entries(), metadata={"pad": "x"}, header_length=length))
    assert list(read_lora_file(path).modules) == [CANONICAL]


def test_metadata_padding_and_long_metadata(tmp_path: Path) -> None:
    save_path = tmp_path / "meta.safetensors"
    tensors = {f"{STEM}.lora_down.weight": torch.ones(2, 8), f"{STEM}.lora_up.weight": torch.ones(8, 2)}
    save_file(tensors, str(save_path), metadata={"ss_tag_frequency": "y" * 70_000})
    lora = read_lora_file(save_path)
    assert lora.metadata["ss_tag_frequency"] == "y" * 70_000


def test_zero_tensor_files_are_safetensors_without_layers(tmp_path: Path) -> None:
    for name, data in (
        ("empty-object", _raw_file([])),
        ("metadata-only", _raw_file([], metadata={"modelspec.architecture": "stable-diffusion-v1"})),
    ):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        contents = read_safetensors(path)
        assert contents.tensors == {}
        with pytest.raises(LoraFileError, match="no LoRA layers found"):
            read_lora_file(path)


def test_pickles_and_zips_get_one_message_and_are_never_unpickled(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # would run on unpickling
            return (Path(tmp_path / "pwned").write_text, ("x",))

    legacy = tmp_path / "legacy.safetensors"
    legacy.write_bytes(pickle.dumps(Payload(), protocol=2))
    zipped = tmp_path / "zipped.safetensors"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    zipped.write_bytes(buffer.getvalue())
    torch_saved = tmp_path / "torch.safetensors"
    torch.save({"w": torch.ones(2)}, str(torch_saved))
    for path in (legacy, zipped, torch_saved, tmp_path / "named.pt"):
        if not path.exists():
            path.write_bytes(pickle.dumps(Payload()))
        with pytest.raises(LoraFileError) as info:
            read_lora_file(path)
        assert info.value.reason == pickle_refusal(path)
    assert not (tmp_path / "pwned").exists()


class _CountingOpen:
    def __init__(self) -> None:
        self.bytes_read = 0

    def __call__(self, *args, **kwargs):
        handle = builtins.open(*args, **kwargs)  # noqa: SIM115 - closed by the wrapper's __exit__
        counter = self

        class Wrapped:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def fileno(self):
                return handle.fileno()

            def read(self, size: int = -1) -> bytes:
                data = handle.read(size)
                counter.bytes_read += len(data)
                return data

        return Wrapped()


@pytest.mark.parametrize(
    ("claimed", "message"), [(2_000_000_000, "more than the format's limit"), (4096, "header claims 4096")]
)
def test_lying_header_length_is_refused_after_eight_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claimed: int, message: str
) -> None:
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", claimed) + b"{")
        if claimed > HEADER_LIMIT:
            handle.truncate(2 * 1024**3)  # sparse 2 GB: reading it whole would take a minute
        else:
            handle.write(b" " * 100)
    counting = _CountingOpen()
    monkeypatch.setattr(safetensors_header, "open", counting, raising=False)
    with pytest.raises(LoraFileError, match=message):
        read_safetensors(path)
    assert counting.bytes_read <= 9


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: [(e[0][0], "F32", e[0][2], e[0][3] + b"\0\0\0\0"), e[1]], "does not match"),
        (lambda e: [e[0], (e[1][0], "F32", [8, 3], e[1][3])], "does not match"),
        (lambda e: [e[0], (e[1][0], "C64", e[1][2], e[1][3])], "unsupported tensor dtype 'C64'"),
    ],
    ids=["size", "shape", "dtype"],
)
def test_inconsistent_entries_name_the_key(tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw_file(mutate(_lora_entries())))
    with pytest.raises(LoraFileError, match=message) as info:
        read_lora_file(path)
    assert info.value.key is not None


def test_holes_overlaps_and_trailing_bytes_are_refused(tmp_path: Path) -> None:
    good = _raw_file(_lora_entries())
    path = tmp_path / "trailing.safetensors"
    path.write_bytes(good + b"\0" * 4)
    with pytest.raises(LoraFileError, match="after its last tensor"):
        read_safetensors(path)
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + length])
    header[f"{STEM}.lora_up.weight"]["data_offsets"] = [0, 64]  # overlaps the down weight
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + good[8 + length :])
    with pytest.raises(LoraFileError, match="inconsistent safetensors offsets"):
        read_safetensors(path)


def test_not_json_and_random_bytes_are_corrupt_not_pickles(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{abc" + b"\0" * 16)
    with pytest.raises(LoraFileError, match="corrupt safetensors header"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(LoraFileError, match="must start with"):
        read_safetensors(path)
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(LoraFileError, match="truncated"):
        read_safetensors(path)


_ALPHA_DTYPES = {
    "I8": "b",
    "U8": "B",
    "I16": "h",
    "U16": "H",
    "I32": "i",
    "U32": "I",
    "I64": "q",
    "U64": "Q",
    "F32": "f",
    "F64": "d",
}


@pytest.mark.parametrize("dtype", [*_ALPHA_DTYPES, "F16", "BF16"])
def test_scalar_alpha_in_every_numeric_dtype(tmp_path: Path, dtype: str) -> None:
    if dtype in _ALPHA_DTYPES:
        data = struct.pack("<" + _ALPHA_DTYPES[dtype], 4)
    else:
        torch_dtype = torch.float16 if dtype == "F16" else torch.bfloat16
        data = torch.tensor(4.0, dtype=torch_dtype).view(torch.int16).numpy().tobytes()
    entries = [*_lora_entries(rank=2), (f"{STEM}.alpha", dtype, [], data)]
    path = tmp_path / f"alpha-{dtype}.safetensors"
    path.write_bytes(_raw_file(entries))
    assert read_lora_file(path).modules[CANONICAL].scale == pytest.approx(2.0)


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_weights_read_exactly(tmp_path: Path, fp8: str) -> None:
    g = torch.Generator().manual_seed(1)
    down = torch.randn(2, 8, generator=g).to(getattr(torch, fp8))
    up = torch.randn(8, 2, generator=g).to(getattr(torch, fp8))
    path = tmp_path / "fp8.safetensors"
    save_file({f"{STEM}.lora_down.weight": down, f"{STEM}.lora_up.weight": up}, str(path))
    module = read_lora_file(path).modules[CANONICAL]
    torch.testing.assert_close(module.delta(), up.float() @ down.float())


def test_integer_weights_are_refused_by_name(tmp_path: Path) -> None:
    entries = _lora_entries()
    entries[0] = (entries[0][0], "I32", entries[0][2], entries[0][3])
    path = tmp_path / "int.safetensors"
    path.write_bytes(_raw_file(entries))
    with pytest.raises(LoraFileError, match="stored as I32"):
        read_lora_file(path)


_TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]


def test_property_every_file_safe_open_reads_is_never_refused(tmp_path: Path) -> None:
    """Seeded random files: names, shapes, dtypes and metadata of random sizes (so header lengths take
    every low byte); whenever the reference reader opens one, ours reads the same tensors."""
    rng = random.Random(12)
    path = tmp_path / "random.safetensors"
    opened = 0
    for case in range(300):
        tensors = {}
        for index in range(rng.randint(0, 4)):
            shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
            dtype = rng.choice(_TORCH_DTYPES)
            tensors[f"t{index}.{'x' * rng.randint(0, 40)}"] = (torch.rand(shape) * 10).to(dtype)
        metadata = {f"k{i}": "v" * rng.randint(0, 300) for i in range(rng.randint(0, 3))}
        save_file(tensors, str(path), metadata=metadata or None)
        try:
            with safe_open(str(path), "pt") as handle:
                expected = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except Exception:  # safetensors 0.4.2 (A1111's pin) cannot open some files it writes itself
            continue
        opened += 1
        contents = read_safetensors(path)
        assert set(contents.tensors) == set(expected), case
        for key, tensor in expected.items():
            assert torch.equal(contents.tensors[key].to(tensor.dtype), tensor), (case, key)
    assert opened >= 150  # most cases exercise our reader, whatever the reference reader's version


def test_property_mutated_bytes_never_read_as_pickle_when_safe_open_reads_them(tmp_path: Path) -> None:
    """Flip bytes of valid files; every mutant safe_open still accepts is accepted by us too."""
    rng = random.Random(7)
    path = tmp_path / "base.safetensors"
    save_file({"a": torch.ones(64, 8), "b": torch.zeros(4)}, str(path), metadata={"m": "z" * 50})
    original = bytearray(path.read_bytes())
    mutant_path = tmp_path / "mutant.safetensors"
    accepted = 0
    for _ in range(400):
        mutant = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            mutant[rng.randrange(len(mutant))] = rng.randrange(256)
        mutant_path.write_bytes(bytes(mutant))
        try:
            with safe_open(str(mutant_path), "pt") as handle:
                list(handle.keys())
        except Exception:
            continue
        accepted += 1
        read_safetensors(mutant_path)
    assert accepted > 100  # most flips land in tensor data or metadata text and keep the file valid
