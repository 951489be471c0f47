"""The request validator reads the chosen LoRA files as the plan route does: a file that cannot work is a
422 naming it before the job is queued (never a 500, never minutes of sampling), the user's file is never
changed, and a pickle gets the same message on every path."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lib_klora.errors import KLoraError, LoraFileError
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import check_lora_files, plan_from_files
from lib_klora.loras.safetensors_header import pickle_refusal
from lib_klora.web import api

fastapi = pytest.importorskip("fastapi")
testclient = pytest.importorskip("starlette.testclient")

TXT2IMG = "/sdapi/v1/txt2img"
Q = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _lora(path: Path, cross_dim: int, seed: int, *, nan: bool = False) -> Path:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(4, cross_dim, generator=g)
    if nan:
        down[0, 0] = float("nan")
    save_file(
        {
            f"lora_unet_{Q}.lora_down.weight": down,
            f"lora_unet_{Q}.lora_up.weight": torch.randn(320, 4, generator=g),
        },
        str(path),
    )
    return path


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    _lora(tmp_path / "subj.safetensors", 768, 1)
    _lora(tmp_path / "sty.safetensors", 768, 2)
    _lora(tmp_path / "xl.safetensors", 2048, 3)
    _lora(tmp_path / "nan.safetensors", 768, 4, nan=True)
    good = (tmp_path / "subj.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2_000_000_000) + b"{}")
    torch.save({"w": torch.ones(2)}, str(tmp_path / "pickled.pt"))
    return tmp_path


class Host:
    """What hosts/webui.py hands the validator: names resolved in the LoRA folder, files checked with the
    loaded model's architecture."""

    def __init__(self, lora_dir: Path, model_architecture: str | None = None) -> None:
        self.lora_dir, self.model_architecture = lora_dir, model_architecture

    def file(self, name: str) -> Path:
        for suffix in (".safetensors", ".pt"):
            if (self.lora_dir / f"{name}{suffix}").exists():
                path = self.lora_dir / f"{name}{suffix}"
                if suffix == ".pt":
                    raise KLoraError(f"K-LoRA: LoRA '{name}': {pickle_refusal(path)}")
                return path
        raise KLoraError(f"K-LoRA: LoRA '{name}' is not in the WebUI's LoRA list")

    def exists(self, name: str) -> bool:
        try:
            self.file(name)
        except KLoraError as exc:
            if "pickle" in str(exc):
                raise
            return False
        return True

    def check(self, subject: str, style: str) -> None:
        check_lora_files([self.file(subject), self.file(style)], self.model_architecture)


def _client(host: Host) -> Any:
    app = fastapi.FastAPI()

    async def generate(payload: dict) -> dict:
        return {"images": []}

    app.add_api_route(TXT2IMG, generate, methods=["POST"])
    client = testclient.TestClient(app)
    api.install_request_validator(app, resolve_lora=host.exists, check_loras=host.check)
    return client


def _post(client: Any, subject: str, style: str, **extra: Any) -> Any:
    args = {"enabled": True, "subject": subject, "style": style, **extra}
    body = {"prompt": "a dog", "alwayson_scripts": {"K-LoRA": {"args": [args]}}}
    return client.post(TXT2IMG, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("style", "message"),
    [
        ("cut", "cut.safetensors.*truncated"),
        ("random", "random.safetensors.*not a safetensors file|random.safetensors.*truncated"),
        ("huge", "huge.safetensors.*limit"),
        ("nan", "nan.safetensors.*NaN or Inf"),
        ("xl", r"different base models \(subj.safetensors is sd1, xl.safetensors is sdxl\)"),
        ("pickled", "pickled.pt' is a pickle checkpoint"),
    ],
)
def test_unusable_files_are_a_422_naming_the_file(lora_dir: Path, style: str, message: str) -> None:
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in lora_dir.iterdir()}
    with _client(Host(lora_dir)) as client:
        response = _post(client, "subj", style)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("alwayson_scripts['K-LoRA'].args: ")
    assert re.search(message, response.json()["detail"]), response.json()["detail"]
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in lora_dir.iterdir()}
    assert after == before  # read only: nothing renamed, nothing written


def test_a_lora_for_another_model_than_the_loaded_one(lora_dir: Path) -> None:
    with _client(Host(lora_dir, model_architecture="sdxl")) as client:
        response = _post(client, "subj", "sty")
        assert response.status_code == 422
        assert (
            "subj.safetensors was trained for a different base model (sd1) than the loaded one (sdxl)"
            in (response.json()["detail"])
        )
    with _client(Host(lora_dir, model_architecture="sd1")) as client:
        assert _post(client, "subj", "sty").status_code == 200


def test_tag_route_checks_files_too(lora_dir: Path) -> None:
    with _client(Host(lora_dir)) as client:
        body = {"prompt": "a dog <klora:subj:nan>"}
        response = client.post(
            TXT2IMG, content=json.dumps(body), headers={"content-type": "application/json"}
        )
    assert response.status_code == 422
    assert response.json()["detail"].startswith("prompt: <klora:subj:nan>: ") and "NaN" in response.text


def test_a_disabled_script_does_not_read_files(lora_dir: Path) -> None:
    with _client(Host(lora_dir)) as client:
        assert _post(client, "subj", "nan", **{"enabled": False}).status_code == 200


def test_pickle_message_is_the_same_on_every_path(lora_dir: Path) -> None:
    host = Host(lora_dir)
    with _client(host) as client:
        via_api = _post(client, "subj", "pickled").json()["detail"]
    with pytest.raises(api.RequestRejected) as plan_error:
        api.build_plan_response(
            {"subject": "subj", "style": "pickled", "steps": 10},
            lambda s, t, settings: plan_from_files(host.file(s), host.file(t), settings, cache=ScoreCache()),
        )
    with pytest.raises(LoraFileError) as reader_error:  # the CLI's path: the file itself
        plan_from_files(lora_dir / "subj.safetensors", lora_dir / "pickled.pt", cache=ScoreCache())
    refusal = pickle_refusal(lora_dir / "pickled.pt")
    assert refusal in via_api and refusal in str(plan_error.value) and refusal in str(reader_error.value)


def test_repeated_checks_do_not_reread_unchanged_files(
    lora_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lib_klora.fusion import from_files

    reads: list[Path] = []
    real = from_files.read_lora_file
    monkeypatch.setattr(from_files, "read_lora_file", lambda p: reads.append(Path(p)) or real(p))
    host = Host(lora_dir)
    for _ in range(3):
        host.check("subj", "sty")
    assert sorted(p.name for p in reads) == ["sty.safetensors", "subj.safetensors"]
    save_file({"x": torch.ones(1)}, str(lora_dir / "sty.safetensors"))  # changed: read again, and refused
    with pytest.raises(LoraFileError, match="no LoRA layers"):
        host.check("subj", "sty")
