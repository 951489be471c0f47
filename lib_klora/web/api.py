"""HTTP layer: request validation for the WebUI's generation API, and K-LoRA's own routes.

Host-free on purpose: nothing here imports the WebUI's ``modules``. The host hands in what it knows (how to
resolve a LoRA name, how to build a plan from two names) as callables. Starlette/FastAPI are imported inside
functions only, so the core stays importable (and testable) without them.

Two parts:

* ``KLoraRequestValidator``: a *pure* ASGI middleware that rejects a bad ``POST /sdapi/v1/txt2img|img2img``
  with HTTP 422 before the job is queued. It must be pure ASGI: on A1111's Starlette 0.26.1 the usual
  ``@app.middleware("http")`` + ``await request.body()`` hangs every valid request (fixed upstream in 0.28).
* ``register_routes``: ``GET /klora/v1/version``, ``GET /klora/v1/schema`` and ``POST /klora/v1/plan``.

Both answer user errors with ``422 {"detail": "<message naming the field>"}``; nothing a user sends should
produce a 500. Routes return plain ``JSONResponse`` objects (no ``response_model``) so the same code runs on
FastAPI 0.94 + pydantic 1.10 (A1111) and FastAPI 0.112+ + pydantic 2 (Forge).
"""

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

try:  # pydantic 2 ships the v1 API as pydantic.v1; A1111 has pydantic 1.10 itself
    from pydantic.v1 import BaseModel, Extra, StrictBool, StrictStr, ValidationError, conint
except ImportError:  # pragma: no cover - depends on the installed pydantic
    from pydantic import BaseModel, Extra, StrictBool, StrictStr, ValidationError, conint  # type: ignore

from lib_klora.fusion.options import MAX_STEPS
from lib_klora.params.model import KLoraParams
from lib_klora.params.prompt_tag import (
    HIRES_PAIR_RULE,
    TAG_NAME,
    find_tags,
    format_tag,
    params_from_tag,
    same_loras,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_SCRIPT_TITLE = "K-LoRA"
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
PROMPT_FIELDS = ("prompt", "hr_prompt")  # the host parses extra-network tags in these (not the negatives)
ROUTE_PREFIX = "/klora/v1"
MAX_PLAN_STEPS = MAX_STEPS


class RequestRejected(ValueError):
    """A generation request K-LoRA cannot run; the message names the field."""


# --- validation of /sdapi/v1/txt2img|img2img bodies -------------------------------------------------------


def _find_script_entries(body: Mapping[str, Any], script_title: str) -> list[tuple[str, Any]]:
    scripts = body.get("alwayson_scripts")
    if not isinstance(scripts, Mapping):
        return []  # absent, null or a wrong type: the host's own model validation answers the latter
    wanted = script_title.lower()  # the host matches `title().lower()` (api.py script_name_to_index)
    return [(key, value) for key, value in scripts.items() if isinstance(key, str) and key.lower() == wanted]


def _args_params(key: str, entry: Any) -> KLoraParams | None:
    where = f"alwayson_scripts[{key!r}]"
    if not isinstance(entry, Mapping):
        raise RequestRejected(f'{where} must be an object like {{"args": [...]}}')
    if "args" not in entry:
        return None  # the host then keeps the UI defaults for every slot
    args = entry["args"]
    if not isinstance(args, list):
        raise RequestRejected(f"{where}.args must be a list (one object, or positional values)")
    try:
        return KLoraParams.from_any(args)
    except ValueError as exc:  # ParamsError and pydantic's ValidationError are both ValueErrors
        raise RequestRejected(f"{where}.args: {exc}") from None


def _check_names(params: KLoraParams, resolve_lora: Callable[[str], bool], where: str) -> None:
    for field in ("subject", "style"):
        name = getattr(params, field, None)
        if not (isinstance(name, str) and name.strip()):
            continue
        try:
            known = resolve_lora(name)
        except ValueError as exc:  # a LoRA that exists but can never be used (a pickle): its own message
            raise RequestRejected(f"{where}: {field}: {exc}") from None
        if not known:
            raise RequestRejected(f"{where}: {field}: unknown LoRA {name!r}")


# (subject name, style name) -> None; raises a ValueError (KLoraError) naming the file that cannot be used.
CheckLoras = Callable[[str, str], None]


def _check_files(params: KLoraParams, check_loras: CheckLoras | None, where: str) -> None:
    if check_loras is None or not params.subject or not params.style:
        return
    try:
        check_loras(params.subject, params.style)
    except ValueError as exc:  # LoraFileError / IncompatibleLorasError: they name the file
        raise RequestRejected(f"{where}: {exc}") from None
    except OSError as exc:
        raise RequestRejected(f"{where}: cannot read LoRA: {exc}") from None


def validate_generation_request(
    body: Mapping[str, Any],
    *,
    script_title: str = DEFAULT_SCRIPT_TITLE,
    resolve_lora: Callable[[str], bool] | None = None,
    check_loras: CheckLoras | None = None,
) -> bool:
    """Check K-LoRA's part of a txt2img/img2img request body.

    Returns False when the request does not involve K-LoRA at all, True when it does and is valid; raises
    ``RequestRejected`` (a ValueError) with a message naming the field otherwise. ``check_loras`` reads the
    chosen files as the plan route does (corrupt, truncated, NaN/Inf, different base models), so a file
    that cannot work is a 422 before the job is queued rather than a failure minutes into sampling.
    """
    entries = _find_script_entries(body, script_title)
    found = [(f, find_tags(body[f])) for f in PROMPT_FIELDS if isinstance(body.get(f), str)]
    tagged = [(f, tags) for f, tags in found if tags]
    if not entries and not tagged:
        return False

    base = KLoraParams()
    for key, entry in entries:
        params = _args_params(key, entry)
        if params is None:
            continue
        base = params
        # Only an enabled script touches the LoRAs; a disabled one with a stale name must not block the job.
        if getattr(params, "enabled", False):
            where = f"alwayson_scripts[{key!r}].args"
            if resolve_lora is not None:
                _check_names(params, resolve_lora, where)
            _check_files(params, check_loras, where)

    first_tag_per_field: dict[str, KLoraParams] = {}
    for field, tags in tagged:
        for positional, named in tags:
            try:
                # Tags override the script args (tag > UI/API), and a tag alone enables K-LoRA.
                params = params_from_tag(positional, named, base)
            except ValueError as exc:  # ParamsError: its message starts with the tag as written
                raise RequestRejected(f"{field}: {exc}") from None
            where = f"{field}: {format_tag(positional, named)}"
            if resolve_lora is not None:
                _check_names(params, resolve_lora, where)
            _check_files(params, check_loras, where)
            first_tag_per_field.setdefault(field, params)
    if not same_loras(*first_tag_per_field.values()):  # the job would stop at its start: say so now
        raise RequestRejected(f"hr_prompt: {HIRES_PAIR_RULE}")
    return True


def _json_response_messages(status: int, payload: Mapping[str, Any]) -> list[Message]:
    data = json.dumps(payload).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode("ascii"))]
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": data, "more_body": False},
    ]


class KLoraRequestValidator:
    """Pure ASGI middleware: 422 for a bad K-LoRA generation request, before the host queues the job.

    For ``POST .../sdapi/v1/txt2img`` and ``.../img2img`` it buffers the whole body, validates K-LoRA's
    ``alwayson_scripts`` entry and any ``<klora:...>`` tag in ``prompt`` / ``hr_prompt``, and either answers
    422 itself (the app is never called) or replays the identical bytes downstream. Everything else (other
    paths and methods, websockets, lifespan, bodies that are not JSON) passes through untouched; FastAPI then
    reports malformed JSON with its own 422.

    ``authorize(headers) -> bool``: when given and it returns False the request is passed through unvalidated,
    so the host's own auth answers 401 rather than this middleware answering 422 (the middleware is outermost,
    in front of ``--api-auth``, which is a route dependency).
    """

    klora_request_validator = True  # marker: lets a re-install replace an older instance (see install)

    def __init__(
        self,
        app: ASGIApp,
        *,
        script_title: str = DEFAULT_SCRIPT_TITLE,
        resolve_lora: Callable[[str], bool] | None = None,
        check_loras: CheckLoras | None = None,
        authorize: Callable[[Mapping[str, str]], bool] | None = None,
        paths: Iterable[str] = GENERATION_PATHS,
    ) -> None:
        self.app = app
        self.script_title = script_title
        self.resolve_lora = resolve_lora
        self.check_loras = check_loras
        self.authorize = authorize
        self.paths = tuple(p.rstrip("/") for p in paths)
        # Cheap pre-check: without a JSON \u escape, a body that involves K-LoRA must name the script or the
        # tag. re.IGNORECASE on bytes folds ASCII only, so a non-ASCII title turns the pre-check off.
        self._involved: re.Pattern[bytes] | None = None
        if script_title.isascii():
            needles = (b"\\u", TAG_NAME.encode("ascii"), script_title.encode("ascii"))
            self._involved = re.compile(b"|".join(map(re.escape, needles)), re.IGNORECASE)

    def _applies(self, scope: Scope) -> bool:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return False
        # endswith: scope["path"] includes root_path on newer Starlette/uvicorn, not on older ones.
        path = str(scope.get("path", "")).rstrip("/")
        return path.endswith(self.paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._applies(scope):
            await self.app(scope, receive, send)
            return

        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending the whole body: nobody to answer
            if message["type"] != "http.request":
                continue
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks

        # Off the event loop: checking the chosen LoRA files reads them.
        error = await asyncio.get_running_loop().run_in_executor(None, self._check, scope, body)
        if error is not None:
            log.info("K-LoRA: rejected %s: %s", scope.get("path"), error)
            for reply in _json_response_messages(422, {"detail": error}):
                await send(reply)
            return

        replayed = False

        async def replay() -> Message:
            # The buffered body exactly once, then the real channel (disconnect notices while streaming).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check(self, scope: Scope, body: bytes) -> str | None:
        """The 422 message, or None to pass the request on."""
        try:
            if self.authorize is not None and not self.authorize(_headers(scope)):
                return None  # unauthenticated: let the host's auth answer 401, not us 422 (pitfall P7)
            if self._involved is not None and not self._involved.search(body):
                return None  # cannot involve K-LoRA; spares parsing large img2img bodies
            try:
                data = json.loads(body)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
                return None  # not JSON: FastAPI answers with its own 422
            if not isinstance(data, dict):
                return None
            validate_generation_request(
                data,
                script_title=self.script_title,
                resolve_lora=self.resolve_lora,
                check_loras=self.check_loras,
            )
        except RequestRejected as exc:
            return str(exc)  # already says where: the alwayson_scripts entry or the tag, then the field
        except Exception:  # a bug here must never block generation: fail open, the script re-validates
            log.exception("K-LoRA: request validation failed unexpectedly; passing the request on")
        return None


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}


def basic_auth_checker(credentials: Mapping[str, str]) -> Callable[[Mapping[str, str]], bool]:
    """``authorize`` for HTTP Basic credentials (user -> password), as the host's ``--api-auth`` uses."""

    def authorize(headers: Mapping[str, str]) -> bool:
        value = headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = (
                base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = credentials.get(user)
        # compare_digest on bytes: constant time, and it accepts non-ASCII.
        return (
            bool(sep)
            and expected is not None
            and secrets.compare_digest(password.encode("utf-8"), expected.encode("utf-8"))
        )

    return authorize


def _is_validator(middleware: Any) -> bool:
    # By marker, not identity: after a script reload the class object is a new one.
    return bool(getattr(getattr(middleware, "cls", None), "klora_request_validator", False))


def install_request_validator(app: Any, **kwargs: Any) -> None:
    """Add ``KLoraRequestValidator`` as the outermost user middleware of an app that may already be serving.

    For the host's ``on_app_started``. Starlette refuses ``add_middleware`` once ``middleware_stack`` is built
    ("Cannot add middleware after an application has started", 0.26.1 and later alike), so clear it, add,
    and rebuild at once (a request racing the rebuild just builds the stack itself: ``Starlette.__call__``).
    A second call (UI reload) replaces the earlier instance instead of stacking another one.
    """
    app.user_middleware[:] = [m for m in app.user_middleware if not _is_validator(m)]
    app.middleware_stack = None
    app.add_middleware(KLoraRequestValidator, **kwargs)  # inserted at 0: outermost of the user middleware
    app.middleware_stack = app.build_middleware_stack()


# --- K-LoRA's own routes --------------------------------------------------------------------------------


class PlanRequest(BaseModel):
    """Body of ``POST /klora/v1/plan``."""

    subject: StrictStr
    style: StrictStr
    steps: conint(strict=True, ge=1, le=MAX_PLAN_STEPS)  # type: ignore[valid-type]
    params: dict[str, Any] | None = None
    png: StrictBool = False

    class Config:
        extra = Extra.forbid  # a misspelt key is an error, not a silent default


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


PlanForNames = Callable[[str, str, Any], Any]  # (subject name, style name, PlanSettings) -> FusionPlan


def build_plan_response(body: Any, plan_for_names: PlanForNames) -> dict[str, Any]:
    """The ``/klora/v1/plan`` answer for a parsed JSON body; raises ``RequestRejected`` for user errors.

    Blocking (scoring may read two LoRA files): the route runs it in a worker thread.
    """
    if not isinstance(body, dict):
        raise RequestRejected("body must be a JSON object")
    try:
        request = PlanRequest.parse_obj(body)
    except ValidationError as exc:
        raise RequestRejected(_validation_message(exc)) from None
    # The top-level names win over any in params: they are what the route documents. A plan request
    # means "as if enabled" (a disabled KLoraParams has no plan settings).
    merged = {**(request.params or {}), "enabled": True, "subject": request.subject, "style": request.style}
    try:
        params = KLoraParams.from_any([merged])
    except ValueError as exc:
        raise RequestRejected(f"params: {exc}") from None
    try:
        plan = plan_for_names(params.subject, params.style, params.to_plan_settings())
        document = plan.to_json(request.steps)
        if request.png:
            document["map_png"] = _map_png_base64(plan, request.steps)
    except ValueError as exc:  # ParamsError/KLoraError (unknown name, unusable file), bad settings
        raise RequestRejected(str(exc)) from None
    except OSError as exc:  # a LoRA file the host named but cannot read
        raise RequestRejected(f"cannot read LoRA: {exc}") from None
    return document


def _map_png_base64(plan: Any, steps: int) -> str:
    from lib_klora.fusion.selection_map import render_selection_map

    schedule = plan.schedule(steps)
    image = render_selection_map(plan.layer_names, schedule.choices.tolist(), schedule.labels, plan.title())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def register_routes(
    app: Any, *, version: str, plan_for_names: PlanForNames, prefix: str = ROUTE_PREFIX, host: str = ""
) -> list[str]:
    """Add ``GET {prefix}/version``, ``GET {prefix}/schema`` and ``POST {prefix}/plan`` to a FastAPI app.

    ``plan_for_names(subject, style, settings)`` maps LoRA names to files and returns a ``FusionPlan``; it
    raises ``ParamsError``/``KLoraError`` for unknown names. Routes added by an earlier call are replaced, so
    a re-run hook does not leave stale closures first in line. Returns the paths added.
    """
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    def reject(message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=422)

    async def get_version() -> JSONResponse:
        return JSONResponse({"version": version, "host": host} if host else {"version": version})

    async def get_schema() -> JSONResponse:
        return JSONResponse(KLoraParams.json_schema())

    async def post_plan(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            return reject("body must be a JSON object")
        try:
            document = await run_in_threadpool(build_plan_response, body, plan_for_names)
        except RequestRejected as exc:
            return reject(str(exc))
        return JSONResponse(document)

    routes: list[tuple[str, Callable[..., Awaitable[JSONResponse]], str]] = [
        (f"{prefix}/version", get_version, "GET"),
        (f"{prefix}/schema", get_schema, "GET"),
        (f"{prefix}/plan", post_plan, "POST"),
    ]
    ours = {path for path, _, _ in routes}
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ours]
    for path, endpoint, method in routes:
        app.add_api_route(path, endpoint, methods=[method], response_model=None, tags=["K-LoRA"])
    return [path for path, _, _ in routes]
