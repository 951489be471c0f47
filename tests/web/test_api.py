"""The HTTP layer (lib_klora.web.api) on a real FastAPI app.

Runs on FastAPI 0.94 / Starlette 0.26.1 / pydantic 1.10 (A1111) and on current FastAPI / pydantic 2
(Forge). The generation routes here are fakes that record the body they got; the app also carries what
A1111 stacks on its real app (GZip and a BaseHTTPMiddleware), because that is where a body-reading
middleware hangs on Starlette 0.26.1.
"""

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest

from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import plan_from_files
from lib_klora.fusion.plan import PlanSettings
from lib_klora.params.model import POSITIONAL_FIELDS, KLoraParams
from lib_klora.params.parsing import ParamsError
from lib_klora.web import api

fastapi = pytest.importorskip("fastapi")
testclient = pytest.importorskip("starlette.testclient")  # needs httpx
gzip = pytest.importorskip("starlette.middleware.gzip")

TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
KNOWN_LORAS = {"subj", "sty"}

VALID_ARGS = {"enabled": True, "subject": "subj", "style": "sty", "alpha": 2.0, "pattern": "s*"}


def resolve_lora(name: str) -> bool:
    return name in KNOWN_LORAS


def make_app(received: list[bytes]) -> Any:
    app = fastapi.FastAPI()
    # What A1111 puts on its app (webui.py / api.py): GZip, and `@app.middleware("http")` (log_and_time).
    app.add_middleware(gzip.GZipMiddleware, minimum_size=1000)

    @app.middleware("http")
    async def log_and_time(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["X-Process-Time"] = "0"
        return response

    # `payload: dict` is a JSON body parameter, so FastAPI answers malformed JSON with its own 422.
    async def generate(request: fastapi.Request, payload: dict) -> dict:
        received.append(await request.body())
        return {"images": [], "prompt": payload.get("prompt")}

    for path in (TXT2IMG, IMG2IMG, "/other"):
        app.add_api_route(path, generate, methods=["POST"])
    return app


def post_json(client: Any, path: str, body: Any, **headers: str) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    return client.post(path, content=data, headers={"content-type": "application/json", **headers})


def request_body(args: Any = None, *, key: str = "K-LoRA", **fields: Any) -> dict:
    body: dict[str, Any] = {"prompt": "a dog", "steps": 20, **fields}
    if args is not None:
        body["alwayson_scripts"] = {key: {"args": args}}
    return body


@pytest.fixture
def received() -> list[bytes]:
    return []


@pytest.fixture
def client(received: list[bytes]) -> Any:
    app = make_app(received)
    with testclient.TestClient(app) as client:
        # As in the host: installed from on_app_started, after the app has served (stack already built).
        assert client.post("/other", json={"prompt": "warm-up"}).status_code == 200
        api.install_request_validator(app, resolve_lora=resolve_lora)
        received.clear()
        yield client


def detail(response: Any) -> str:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    text = response.json()["detail"]
    assert isinstance(text, str)
    return text


# --- the request validator ----------------------------------------------------------------------------------


def test_valid_dict_args_pass_byte_identical(client: Any, received: list[bytes]) -> None:
    # Odd spacing, key order and non-ASCII text: what arrives must be the very bytes that were sent.
    raw = (
        b'{ "prompt" : "un chien \\u00e9 <lora:x:0.5>",\n "alwayson_scripts": {"K-LoRA": {"args": '
        + json.dumps([VALID_ARGS]).encode()
        + b'}}, "steps":20 ,"hr_prompt": "caf\xc3\xa9"}'
    )
    response = post_json(client, TXT2IMG, raw)
    assert response.status_code == 200, response.text
    assert received == [raw]


def test_img2img_is_validated_too(client: Any, received: list[bytes]) -> None:
    assert post_json(client, IMG2IMG, request_body([VALID_ARGS])).status_code == 200
    assert "alpha" in detail(post_json(client, IMG2IMG, request_body([{**VALID_ARGS, "alpha": "abc"}])))
    assert len(received) == 1


def test_positional_args_pass(client: Any, received: list[bytes]) -> None:
    values = {**KLoraParams().to_dict(), **VALID_ARGS}
    positional = [values[name] for name in POSITIONAL_FIELDS]
    assert post_json(client, TXT2IMG, request_body(positional)).status_code == 200
    assert post_json(client, TXT2IMG, request_body([True, "subj", "sty", 0.5])).status_code == 200
    assert len(received) == 2


def test_bad_positional_value_names_the_field(client: Any, received: list[bytes]) -> None:
    assert "subject_strength" in detail(post_json(client, TXT2IMG, request_body([True, "subj", "sty", "x"])))
    assert received == []


@pytest.mark.parametrize("alpha", ["abc", -1, 0, 1e9])
def test_invalid_alpha_is_422_and_app_not_called(client: Any, received: list[bytes], alpha: Any) -> None:
    message = detail(post_json(client, TXT2IMG, request_body([{**VALID_ARGS, "alpha": alpha}])))
    assert "alpha" in message
    assert "alwayson_scripts" in message
    assert received == []


def _png_base64() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_reference_images_are_checked_before_the_job(client: Any, received: list[bytes]) -> None:
    good = {**VALID_ARGS, "method": "dynamic", "guidance": True, "style_refs": [_png_base64()]}
    assert post_json(client, TXT2IMG, request_body([good])).status_code == 200
    message = detail(post_json(client, TXT2IMG, request_body([{**good, "style_refs": ["%%% not base64"]}])))
    assert "style_refs" in message and "image 1: not valid base64" in message
    not_image = {**good, "subject_refs": [_png_base64(), "aGVsbG8gd29ybGQ="]}  # "hello world"
    assert "image 2: not a readable image" in detail(post_json(client, TXT2IMG, request_body([not_image])))
    no_refs = {**good, "style_refs": []}
    assert "no reference images" in detail(post_json(client, TXT2IMG, request_body([no_refs])))
    assert len(received) == 1


def test_unknown_key_is_422(client: Any, received: list[bytes]) -> None:
    message = detail(post_json(client, TXT2IMG, request_body([{**VALID_ARGS, "alfa": 1.0}])))
    assert "alfa" in message
    assert received == []


def test_script_key_matched_case_insensitively(client: Any, received: list[bytes]) -> None:
    bad = request_body([{**VALID_ARGS, "alpha": "abc"}], key="k-lora")
    assert "alpha" in detail(post_json(client, TXT2IMG, bad))
    # A JSON-escaped key still names our script: the byte pre-check must not skip it.
    escaped = json.dumps(bad).replace('"k-lora"', '"\\u006b-LoRA"').encode()
    assert "alpha" in detail(post_json(client, TXT2IMG, escaped))
    assert received == []


def test_other_scripts_and_absent_args_pass(client: Any, received: list[bytes]) -> None:
    others = {"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [{"alpha": "whatever"}]}}}
    assert post_json(client, TXT2IMG, others).status_code == 200
    no_args = {"prompt": "x", "alwayson_scripts": {"K-LoRA": {}}}  # the host keeps the UI defaults
    assert post_json(client, TXT2IMG, no_args).status_code == 200
    assert len(received) == 2


def test_malformed_entry_is_422(client: Any, received: list[bytes]) -> None:
    assert "args" in detail(post_json(client, TXT2IMG, {"alwayson_scripts": {"K-LoRA": {"args": 3}}}))
    assert "K-LoRA" in detail(post_json(client, TXT2IMG, {"alwayson_scripts": {"K-LoRA": [1, 2]}}))
    assert received == []


def test_enabled_without_names_is_422(client: Any, received: list[bytes]) -> None:
    assert "subject" in detail(post_json(client, TXT2IMG, request_body([{"enabled": True}])))
    assert received == []


def test_bad_tag_in_prompt_is_422(client: Any, received: list[bytes]) -> None:
    message = detail(post_json(client, TXT2IMG, request_body(prompt="a dog <klora:subj:sty:alpha=0>")))
    assert "alpha" in message
    assert "prompt" in message
    message = detail(post_json(client, TXT2IMG, request_body(prompt="<klora:subj:sty:bogus=1>")))
    assert "bogus" in message
    assert received == []


def test_bad_tag_in_hires_prompt_is_422(client: Any, received: list[bytes]) -> None:
    message = detail(post_json(client, TXT2IMG, request_body(hr_prompt="<klora:subj:sty:abc>")))
    assert "hr_prompt" in message
    assert received == []


def test_tags_alone_and_tags_over_args(client: Any, received: list[bytes]) -> None:
    assert (
        post_json(client, TXT2IMG, request_body(prompt="a dog <klora:subj:sty:0.8:te=none>")).status_code
        == 200
    )
    # The tag is checked on top of the args: a valid tag with invalid args still fails on the args.
    bad_args = request_body([{**VALID_ARGS, "seed": -1}], prompt="<klora:subj:sty>")
    assert "seed" in detail(post_json(client, TXT2IMG, bad_args))
    assert len(received) == 1


def test_unknown_lora_is_422_naming_it(client: Any, received: list[bytes]) -> None:
    message = detail(post_json(client, TXT2IMG, request_body([{**VALID_ARGS, "style": "missing_style"}])))
    assert "missing_style" in message
    assert "style" in message
    message = detail(post_json(client, TXT2IMG, request_body(prompt="<klora:nobody:sty>")))
    assert "nobody" in message
    assert received == []


def test_disabled_args_do_not_need_existing_loras(client: Any, received: list[bytes]) -> None:
    disabled = {**VALID_ARGS, "enabled": False, "subject": "gone"}
    assert post_json(client, TXT2IMG, request_body([disabled])).status_code == 200
    assert len(received) == 1


def test_malformed_json_reaches_the_app(client: Any, received: list[bytes]) -> None:
    response = post_json(client, TXT2IMG, b'{"prompt": "<klora:subj:sty>", "alwayson_scripts": {"K-LoRA"')
    assert response.status_code == 422
    assert not isinstance(response.json()["detail"], str)  # FastAPI's own error list, not ours
    assert received == []  # the endpoint never ran: FastAPI rejected the body


def test_non_object_json_and_unrelated_bodies_pass(client: Any, received: list[bytes]) -> None:
    assert post_json(client, TXT2IMG, b"[1, 2]").status_code == 422  # FastAPI: not a dict
    plain = request_body(prompt="a cat")
    assert post_json(client, TXT2IMG, plain).status_code == 200
    assert received == [json.dumps(plain).encode()]


def test_other_paths_and_methods_untouched(client: Any, received: list[bytes]) -> None:
    bad = request_body([{**VALID_ARGS, "alpha": "abc"}])
    assert post_json(client, "/other", bad).status_code == 200
    assert received == [json.dumps(bad).encode()]
    assert client.get(TXT2IMG).status_code == 405  # the app's own answer


def test_authorize_lets_unauthenticated_requests_reach_host_auth(received: list[bytes]) -> None:
    app = make_app(received)
    api.install_request_validator(
        app, resolve_lora=resolve_lora, authorize=api.basic_auth_checker({"user": "pass:word"})
    )
    bad = request_body([{**VALID_ARGS, "alpha": "abc"}])
    good_auth = "Basic " + base64.b64encode(b"user:pass:word").decode()
    wrong_auth = "Basic " + base64.b64encode(b"user:nope").decode()
    with testclient.TestClient(app) as client:
        assert post_json(client, TXT2IMG, bad).status_code == 200  # here the host's auth would say 401
        assert post_json(client, TXT2IMG, bad, authorization=wrong_auth).status_code == 200
        assert post_json(client, TXT2IMG, bad, authorization="Basic !!!").status_code == 200
        assert "alpha" in detail(post_json(client, TXT2IMG, bad, authorization=good_auth))
    assert len(received) == 3


def test_install_replaces_instead_of_stacking(received: list[bytes]) -> None:
    app = make_app(received)
    api.install_request_validator(app, resolve_lora=lambda name: False)
    api.install_request_validator(app, resolve_lora=resolve_lora)
    validators = [m for m in app.user_middleware if m.cls is api.KLoraRequestValidator]
    assert len(validators) == 1
    assert app.user_middleware[0] is validators[0]  # outermost of the user middleware
    with testclient.TestClient(app) as client:
        assert post_json(client, TXT2IMG, request_body([VALID_ARGS])).status_code == 200


def test_validator_fails_open_on_a_bug(
    client: Any, received: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> bool:
        raise RuntimeError("bug")

    monkeypatch.setattr(api, "validate_generation_request", broken)
    assert post_json(client, TXT2IMG, request_body([VALID_ARGS])).status_code == 200
    assert len(received) == 1


def test_resolver_bug_fails_open(received: list[bytes]) -> None:
    def broken(name: str) -> bool:
        raise KeyError(name)

    app = make_app(received)
    api.install_request_validator(app, resolve_lora=broken)
    with testclient.TestClient(app) as client:
        assert post_json(client, TXT2IMG, request_body([VALID_ARGS])).status_code == 200
        assert "alpha" in detail(post_json(client, TXT2IMG, request_body([{**VALID_ARGS, "alpha": 0}])))
    assert len(received) == 1


def test_custom_non_ascii_title(received: list[bytes]) -> None:
    app = make_app(received)
    api.install_request_validator(app, script_title="Fusión")  # pre-check off: must still validate
    with testclient.TestClient(app) as client:
        bad = request_body([{**VALID_ARGS, "alpha": "abc"}], key="FUSIÓN")
        assert "alpha" in detail(post_json(client, TXT2IMG, bad))
        assert post_json(client, TXT2IMG, request_body([{**VALID_ARGS, "alpha": "abc"}])).status_code == 200
    assert len(received) == 1


# --- raw ASGI: chunked bodies, a server that waits for disconnect, non-HTTP scopes --------------------------


def _http_scope(path: str, method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
    }


def drive(app: Any, chunks: list[bytes], path: str = TXT2IMG) -> tuple[int, bytes]:
    """One request straight through ASGI, the body split into `chunks`. Like a real server, `receive`
    blocks after the body until the response is complete: a middleware that loses the body hangs here."""

    async def run() -> tuple[int, bytes]:
        done = asyncio.Event()
        pending = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)
        ]
        status: list[int] = []
        body: list[bytes] = []

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop(0)
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()

        try:
            await asyncio.wait_for(app(_http_scope(path), receive, send), timeout=10)
        except asyncio.TimeoutError:
            pytest.fail("the request hung")
        return status[0], b"".join(body)

    return asyncio.run(run())


def _split(data: bytes, parts: int) -> list[bytes]:
    size = -(-len(data) // parts)
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_chunked_body_is_buffered_and_replayed(received: list[bytes]) -> None:
    app = make_app(received)
    api.install_request_validator(app, resolve_lora=resolve_lora)
    good = json.dumps(request_body([VALID_ARGS], prompt="x" * 5000)).encode()
    status, _ = drive(app, [*_split(good, 7), b""])  # an empty last chunk, as some servers send
    assert status == 200
    assert received == [good]

    bad = json.dumps(request_body([{**VALID_ARGS, "alpha": "abc"}])).encode()
    status, body = drive(app, _split(bad, 5))
    assert status == 422
    assert "alpha" in json.loads(body)["detail"]
    assert received == [good]


def test_client_disconnect_while_buffering_calls_nothing() -> None:
    called: list[Any] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope)

    async def run() -> None:
        messages = [
            {"type": "http.request", "body": b'{"prompt": ', "more_body": True},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            called.append(message)

        await api.KLoraRequestValidator(inner)(_http_scope(TXT2IMG), receive, send)

    asyncio.run(run())
    assert called == []


def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], receive, send))

    async def receive() -> dict[str, Any]:
        raise AssertionError("the validator must not read a non-HTTP channel")

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("the validator must not answer a non-HTTP scope")

    validator = api.KLoraRequestValidator(inner)
    for scope in ({"type": "lifespan"}, {**_http_scope(TXT2IMG), "type": "websocket"}):
        asyncio.run(validator(scope, receive, send))
    assert seen == [("lifespan", receive, send), ("websocket", receive, send)]


def test_root_path_prefixed_and_trailing_slash_paths_are_validated() -> None:
    validator = api.KLoraRequestValidator(lambda *a: None)  # type: ignore[arg-type, return-value]
    assert validator._applies(_http_scope("/proxy/sdapi/v1/txt2img"))
    assert validator._applies(_http_scope("/sdapi/v1/img2img/"))
    assert not validator._applies(_http_scope("/sdapi/v1/txt2img", method="PUT"))
    assert not validator._applies(_http_scope("/sdapi/v1/txt2img-x"))


def test_validate_generation_request_directly() -> None:
    assert api.validate_generation_request({"prompt": "a cat"}) is False
    assert api.validate_generation_request(request_body([VALID_ARGS])) is True
    assert api.validate_generation_request({"prompt": "<klora:a:b>"}) is True
    with pytest.raises(api.RequestRejected, match="unknown LoRA 'b'"):
        api.validate_generation_request({"prompt": "<klora:a:b>"}, resolve_lora=lambda n: n == "a")


# --- routes -------------------------------------------------------------------------------------------------


@pytest.fixture
def plan_client(lora_pair: tuple[Path, Path]) -> Any:
    files = {"subj": lora_pair[0], "sty": lora_pair[1]}
    cache = ScoreCache()

    def plan_for_names(subject: str, style: str, settings: PlanSettings) -> Any:
        for field, name in (("subject", subject), ("style", style)):
            if name not in files:
                raise ParamsError([(field, f"unknown LoRA {name!r}")])
        return plan_from_files(files[subject], files[style], settings, device="cpu", cache=cache)

    app = fastapi.FastAPI()
    api.register_routes(app, version="9.8.7", plan_for_names=plan_for_names)
    with testclient.TestClient(app) as client:
        yield client


def test_version_route(plan_client: Any) -> None:
    response = plan_client.get("/klora/v1/version")
    assert response.status_code == 200
    assert response.json() == {"version": "9.8.7"}


def test_schema_route(plan_client: Any) -> None:
    schema = plan_client.get("/klora/v1/schema").json()
    assert set(POSITIONAL_FIELDS) <= set(schema["properties"])
    assert schema == json.loads(json.dumps(KLoraParams.json_schema()))


def test_openapi_still_builds(plan_client: Any) -> None:
    # /docs of the host must not break because of our routes (FastAPI 0.94 and current alike).
    paths = plan_client.get("/openapi.json").json()["paths"]
    assert {"/klora/v1/version", "/klora/v1/schema", "/klora/v1/plan"} <= set(paths)


def test_plan_route_returns_the_plan_contract(plan_client: Any, lora_pair: tuple[Path, Path]) -> None:
    body = {"subject": "subj", "style": "sty", "steps": 12, "params": {"alpha": 2.5, "pattern": "s*"}}
    response = plan_client.post("/klora/v1/plan", json=body)
    assert response.status_code == 200, response.text
    document = response.json()
    settings = PlanSettings(alpha=2.5, pattern="s*")
    expected = plan_from_files(*lora_pair, settings, device="cpu", cache=ScoreCache()).to_json(12)
    assert document == json.loads(json.dumps(expected))
    assert "map_png" not in document
    assert (document["steps"], document["alpha"], document["pattern"]) == (12, 2.5, "s*")
    assert document["layers"]
    for layer in document["layers"]:
        assert {"name", "k", "score_subject", "score_style", "choices"} <= set(layer)
        assert len(layer["choices"]) == 12


def test_plan_route_png(plan_client: Any) -> None:
    from PIL import Image

    response = plan_client.post(
        "/klora/v1/plan", json={"subject": "subj", "style": "sty", "steps": 8, "png": True}
    )
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["map_png"], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0


@pytest.mark.parametrize("steps", [0, -3, 1001, "20", 2.5, True, None])
def test_plan_route_bad_steps(plan_client: Any, steps: Any) -> None:
    assert "steps" in detail(
        plan_client.post("/klora/v1/plan", json={"subject": "subj", "style": "sty", "steps": steps})
    )


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"subject": "subj", "style": "sty"}, "steps"),
        ({"subject": "subj", "style": "sty", "steps": 5, "stpes": 5}, "stpes"),
        ({"subject": "subj", "style": "sty", "steps": 5, "params": {"alpha": "abc"}}, "alpha"),
        ({"subject": "subj", "style": "sty", "steps": 5, "params": {"bogus": 1}}, "bogus"),
        ({"subject": "subj", "style": "sty", "steps": 5, "params": [1]}, "params"),
        ({"subject": "subj", "style": "sty", "steps": 5, "png": "yes"}, "png"),
        ({"subject": "subj", "style": "sty", "steps": 5, "png": "on"}, "png"),
        ({"subject": "subj", "style": "sty", "steps": 5, "params": {"show_map": "on"}}, "show_map"),
        ({"subject": "subj", "style": "subj", "steps": 5}, "style"),
        ({"subject": "../etc/x", "style": "sty", "steps": 5}, "subject"),
    ],
)
def test_plan_route_invalid_body_names_the_field(plan_client: Any, body: dict, named: str) -> None:
    assert named in detail(plan_client.post("/klora/v1/plan", json=body))


def test_plan_route_unknown_name(plan_client: Any) -> None:
    message = detail(
        plan_client.post("/klora/v1/plan", json={"subject": "subj", "style": "nope", "steps": 5})
    )
    assert "nope" in message
    assert "style" in message


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_plan_route_non_object_body(plan_client: Any, raw: bytes) -> None:
    assert "JSON object" in detail(post_json(plan_client, "/klora/v1/plan", raw))


def test_plan_route_unreadable_file_is_422(lora_pair: tuple[Path, Path], tmp_path: Path) -> None:
    def plan_for_names(subject: str, style: str, settings: PlanSettings) -> Any:
        return plan_from_files(tmp_path / "gone.safetensors", lora_pair[1], settings, cache=ScoreCache())

    app = fastapi.FastAPI()
    api.register_routes(app, version="1", plan_for_names=plan_for_names)
    with testclient.TestClient(app) as client:
        response = client.post("/klora/v1/plan", json={"subject": "a", "style": "b", "steps": 5})
    assert response.status_code == 422


def test_register_routes_twice_replaces(plan_client: Any) -> None:
    app = plan_client.app
    api.register_routes(app, version="2.0", plan_for_names=_never_called)
    paths = [getattr(route, "path", None) for route in app.router.routes]
    assert paths.count("/klora/v1/version") == 1
    assert plan_client.get("/klora/v1/version").json() == {"version": "2.0"}


def _never_called(*_args: Any) -> Any:
    raise AssertionError("not expected")


def test_api_module_does_not_import_the_host() -> None:
    source = Path(api.__file__).read_text(encoding="utf-8")
    assert "import modules" not in source and "from modules" not in source
    assert "\nimport fastapi" not in source and "\nfrom fastapi" not in source
    assert "\nfrom starlette" not in source and "\nimport starlette" not in source


def test_hires_tag_with_another_pair_is_rejected() -> None:
    body = {"prompt": "a <klora:subj:sty>", "hr_prompt": "a <klora:sty:subj>"}
    with pytest.raises(api.RequestRejected, match="same subject and style"):
        api.validate_generation_request(body, resolve_lora=lambda name: True)
    same = {"prompt": "a <klora:subj:sty>", "hr_prompt": "b <klora:subj:sty:pattern=s*>"}
    assert api.validate_generation_request(same, resolve_lora=lambda name: True)


def test_plan_route_refuses_the_dynamic_method(plan_client: Any) -> None:
    body = {"subject": "subj", "style": "sty", "steps": 12, "params": {"method": "dynamic"}}
    response = plan_client.post("/klora/v1/plan", json=body)
    assert response.status_code == 422
    assert "no precomputed plan" in response.json()["detail"]


def test_version_route_names_the_host_when_given() -> None:
    app = fastapi.FastAPI()
    api.register_routes(app, version="1.2.3", plan_for_names=lambda *a: None, host="forge")
    with testclient.TestClient(app) as client:
        assert client.get("/klora/v1/version").json() == {"version": "1.2.3", "host": "forge"}


@pytest.mark.parametrize("value", ["yes", 1, "1", "maybe", "on", "off"])
def test_booleans_in_the_api_dict_are_strict(client: Any, received: list[bytes], value: Any) -> None:
    """pydantic v1 would coerce "yes" and 1 to True; the validator answers 422 naming the field, for "on"
    and "off" with the same message."""
    message = detail(post_json(client, TXT2IMG, request_body([{**VALID_ARGS, "enabled": value}])))
    assert "enabled" in message and "must be true or false" in message
    assert received == []
