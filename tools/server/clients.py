#!/usr/bin/env python3
"""Checks that real API clients work against the server example on the tiny fixture model.

It starts `target/release/examples/server` itself on a free loopback port, waits for
GET /health (polling against a deadline), and drives it with:

  * webuiapi (the AUTOMATIC1111 API client): txt2img, img2img, samplers, models, options,
    progress, interrupt, and with an API key through `set_auth("user", KEY)`;
  * openai: `client.images.generate(..., size="64x64", response_format="b64_json")`.

One line per check; the exit status is 1 when any check failed. "GAP" lines are client calls
the server does not answer (an endpoint it lacks): reported, and failures only with --strict.
Then the server is stopped with SIGTERM and must exit 0 within a deadline.

  .venv-server/bin/python tools/server/clients.py [--binary PATH] [--model DIR]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import secrets
import sys
import traceback

import openai
import webuiapi
from PIL import Image

from serverproc import DEFAULT_BINARY, DEFAULT_MODEL, Server, get_json

SIZE = 64
STEPS = 4


class Checks:
    """Runs named checks, prints one line each, and remembers the failures."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.failed: list[str] = []
        self.gaps: list[str] = []
        self.passed = 0

    def run(self, name: str, fn, *, gap_ok: bool = False):
        try:
            detail = fn()
        except Gap as g:
            if self.strict or not gap_ok:
                self.failed.append(name)
                print(f"FAIL {name}: {g}", flush=True)
            else:
                self.gaps.append(name)
                print(f"GAP  {name}: {g}", flush=True)
            return None
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            self.failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            extra = getattr(e, "exchange", None)
            if extra:
                print(extra, flush=True)
            if not isinstance(e, AssertionError):
                traceback.print_exc(limit=3, file=sys.stdout)
            return None
        self.passed += 1
        print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)
        return detail


class Gap(Exception):
    """The server lacks what a client call needs."""


def check(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def short(text, limit: int = 300) -> str:
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class Recorder:
    """Keeps the last HTTP exchange of a requests.Session, to show what a client sent and what
    the server answered when a call fails."""

    def __init__(self, session):
        self.last = None
        session.hooks["response"].append(self._hook)

    def _hook(self, response, *args, **kwargs):
        self.last = response

    def describe(self) -> str:
        r = self.last
        if r is None:
            return "  (no HTTP exchange recorded)"
        req = r.request
        body = req.body.decode("utf-8", "replace") if isinstance(req.body, bytes) else req.body
        return (
            f"  sent:     {req.method} {req.url}\n"
            f"            body {short(body or '')}\n"
            f"  answered: {r.status_code} {r.headers.get('content-type', '')}\n"
            f"            body {short(r.text)}"
        )


def with_exchange(recorder: Recorder, fn):
    """Runs fn; an exception carries the last exchange for the report."""
    try:
        return fn()
    except Exception as e:
        e.exchange = recorder.describe()
        raise


# -- webuiapi ---------------------------------------------------------------------------------


def webuiapi_checks(checks: Checks, port: int, key: str | None, tag: str) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=STEPS)
    rec = Recorder(api.session)

    if key:
        # Without credentials the server must refuse, with the status webuiapi reports.
        def refused():
            try:
                api.txt2img(prompt="no key", steps=STEPS, width=SIZE, height=SIZE, seed=1)
            except RuntimeError as e:
                status = e.args[0] if e.args else None
                check(status == 401, f"expected RuntimeError(401, ...), got {e.args!r}")
                return f"RuntimeError({status}, {short(e.args[1], 120)})"
            raise AssertionError("txt2img without credentials answered 200")

        checks.run(f"{tag} webuiapi txt2img without auth is refused", lambda: with_exchange(rec, refused))
        api.set_auth("user", key)

    seed = 1234567
    prompt = "a red fox in the snow"
    state: dict = {}

    def txt2img():
        result = api.txt2img(prompt=prompt, steps=STEPS, width=SIZE, height=SIZE, seed=seed)
        check(len(result.images) == 1, f"{len(result.images)} images, expected 1")
        img = result.image
        check(isinstance(img, Image.Image), f"result.image is {type(img)}")
        check(img.size == (SIZE, SIZE), f"image size {img.size}")
        img.load()
        check(isinstance(result.info, dict), f"result.info is {type(result.info)}: {short(result.info)}")
        check(result.info.get("seed") == seed, f"info seed {result.info.get('seed')!r} != {seed}")
        check(result.info.get("all_seeds") == [seed], f"info all_seeds {result.info.get('all_seeds')!r}")
        check(result.info.get("steps") == STEPS, f"info steps {result.info.get('steps')!r}")
        check(
            result.info.get("sampler_name") == "Euler a",
            f"info sampler_name {result.info.get('sampler_name')!r} (webuiapi sends 'Euler a')",
        )
        check(isinstance(result.parameters, dict) and result.parameters.get("prompt") == prompt,
              f"parameters {short(result.parameters)}")
        state["image"] = img
        return (f"{img.size[0]}x{img.size[1]} {img.mode} {img.format}, info.seed={result.info['seed']}, "
                f"sampler={result.info['sampler_name']!r}")

    checks.run(f"{tag} webuiapi txt2img", lambda: with_exchange(rec, txt2img))

    def same_seed():
        again = api.txt2img(prompt=prompt, steps=STEPS, width=SIZE, height=SIZE, seed=seed).image
        check("image" in state, "no first image")
        check(again.tobytes() == state["image"].tobytes(), "the same seed gave other pixels")
        return "identical pixels"

    checks.run(f"{tag} webuiapi txt2img same seed again", lambda: with_exchange(rec, same_seed))

    def batch():
        result = api.txt2img(prompt=prompt, steps=STEPS, width=SIZE, height=SIZE, seed=seed,
                             batch_size=2)
        check(len(result.images) == 2, f"{len(result.images)} images, expected 2")
        check(result.info.get("all_seeds") == [seed, seed + 1], f"all_seeds {result.info.get('all_seeds')!r}")
        return f"2 images, all_seeds={result.info['all_seeds']}"

    checks.run(f"{tag} webuiapi txt2img batch_size=2", lambda: with_exchange(rec, batch))

    def img2img():
        check("image" in state, "no txt2img image to start from")
        result = api.img2img(images=[state["image"]], prompt="a fox at night",
                             denoising_strength=0.5, steps=STEPS, width=SIZE, height=SIZE, seed=42)
        check(len(result.images) == 1, f"{len(result.images)} images, expected 1")
        img = result.image
        check(img.size == (SIZE, SIZE), f"image size {img.size}")
        img.load()
        check(result.info.get("seed") == 42, f"info seed {result.info.get('seed')!r}")
        return f"{img.size[0]}x{img.size[1]} {img.mode}, info.seed={result.info['seed']}"

    checks.run(f"{tag} webuiapi img2img", lambda: with_exchange(rec, img2img))

    def inpaint():
        check("image" in state, "no txt2img image to start from")
        mask = Image.new("L", (SIZE, SIZE), 0)
        mask.paste(255, (16, 16, 48, 48))
        result = api.img2img(images=[state["image"]], mask_image=mask, prompt="a hole",
                             denoising_strength=0.75, steps=STEPS, width=SIZE, height=SIZE, seed=7)
        check(len(result.images) == 1 and result.image.size == (SIZE, SIZE),
              f"{len(result.images)} images of {[i.size for i in result.images]}")
        return f"{result.image.size[0]}x{result.image.size[1]}"

    checks.run(f"{tag} webuiapi img2img with mask_image", lambda: with_exchange(rec, inpaint))

    if hasattr(api, "get_samplers"):
        def samplers():
            items = api.get_samplers()
            check(isinstance(items, list) and items, f"answer {short(items)}")
            names = api.util_get_sampler_names()
            check("Euler a" in names, f"no 'Euler a' in {names}")
            return f"{len(items)} samplers, e.g. {names[:4]}"

        checks.run(f"{tag} webuiapi get_samplers", lambda: with_exchange(rec, samplers))

    if hasattr(api, "get_sd_models"):
        def models():
            items = api.get_sd_models()
            check(isinstance(items, list) and len(items) == 1, f"answer {short(items)}")
            check(api.util_get_model_names() == [items[0]["title"]], "util_get_model_names")
            return f"{items[0]['title']!r} ({items[0]['filename']})"

        checks.run(f"{tag} webuiapi get_sd_models", lambda: with_exchange(rec, models))

    def options():
        opts = api.get_options()
        check(isinstance(opts, dict) and "sd_model_checkpoint" in opts, f"answer {short(opts)}")
        current = api.util_get_current_model()
        api.set_options({"sd_model_checkpoint": current})
        return f"sd_model_checkpoint={current!r}; set_options accepted"

    checks.run(f"{tag} webuiapi get_options/util_get_current_model/set_options",
               lambda: with_exchange(rec, options))

    def progress():
        p = api.get_progress()
        check(p.get("progress") == 0 and p["state"]["job_count"] == 0, f"idle progress {short(p)}")
        api.util_wait_for_ready(check_interval=0.1)
        check(api.interrupt() == {}, "interrupt answer")
        return f"progress={p['progress']}, job_count={p['state']['job_count']}; interrupt -> {{}}"

    checks.run(f"{tag} webuiapi get_progress/util_wait_for_ready/interrupt",
               lambda: with_exchange(rec, progress))

    if hasattr(api, "get_schedulers"):
        # AUTOMATIC1111 1.9+ has GET /sdapi/v1/schedulers; webuiapi's util_get_scheduler_names
        # and its default `scheduler="automatic"` come from it.
        def schedulers():
            try:
                items = api.get_schedulers()
            except ValueError as e:  # requests' JSONDecodeError: no JSON body
                r = rec.last
                raise Gap(f"GET {r.request.path_url} answered {r.status_code} "
                          f"(body {short(r.text) or 'empty'}); get_schedulers() raised "
                          f"{type(e).__name__}") from None
            return f"{len(items)} schedulers"

        checks.run(f"{tag} webuiapi get_schedulers", schedulers, gap_ok=True)


# -- openai -----------------------------------------------------------------------------------


def openai_exchange(e: Exception) -> str | None:
    response = getattr(e, "response", None)
    if response is None:
        return None
    req = response.request
    body = req.content.decode("utf-8", "replace") if req.content else ""
    return (f"  sent:     {req.method} {req.url}\n            body {short(body)}\n"
            f"  answered: {response.status_code}\n            body {short(response.text)}")


def openai_checks(checks: Checks, port: int, key: str | None, tag: str) -> None:
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key=key or "none", max_retries=0, timeout=60)

    def run(fn):
        try:
            return fn()
        except openai.APIError as e:
            e.exchange = openai_exchange(e)
            raise

    def generate(n: int):
        def go():
            r = client.images.generate(prompt="a lighthouse at dusk", n=n, size=f"{SIZE}x{SIZE}",
                                       response_format="b64_json")
            check(r.data is not None and len(r.data) == n, f"{0 if r.data is None else len(r.data)} images, expected {n}")
            sizes = []
            for item in r.data:
                check(item.b64_json, "no b64_json")
                img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
                img.load()
                check(img.format == "PNG", f"format {img.format}")
                check(img.size == (SIZE, SIZE), f"image size {img.size}")
                sizes.append(f"{img.size[0]}x{img.size[1]} {img.format}")
            check(isinstance(r.created, int) and r.created > 0, f"created {r.created!r}")
            return f"{', '.join(sizes)}, created={r.created}, revised_prompt={r.data[0].revised_prompt!r}"
        return go

    checks.run(f"{tag} openai images.generate n=1 size=64x64", lambda: run(generate(1)))
    checks.run(f"{tag} openai images.generate n=2 size=64x64", lambda: run(generate(2)))

    def url_refused():
        try:
            client.images.generate(prompt="x", n=1, size=f"{SIZE}x{SIZE}", response_format="url")
        except openai.BadRequestError as e:
            return f"BadRequestError 400: {short(str(e), 160)}"
        raise AssertionError("response_format=url answered 200")

    checks.run(f"{tag} openai response_format=url is a 400", url_refused)

    # The openai client shows a server's reason only from OpenAI's error shape,
    # {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}.
    def error_message():
        try:
            client.images.generate(prompt="x", n=1, size="65x64", response_format="b64_json")
        except openai.BadRequestError as e:
            raw = e.response.text
            if not isinstance(e.body, dict) or not e.body.get("message"):
                raise Gap(f"the 400's reason is lost by the client: str(e)={str(e)!r}, "
                          f"e.body={e.body!r}, e.type={e.type!r}; the server answered "
                          f"{short(raw, 200)}") from None
            return f"str(e)={short(str(e), 160)!r}"
        raise AssertionError("size 65x64 answered 200")

    checks.run(f"{tag} openai error reason reaches the client", error_message, gap_ok=True)

    if key:
        def wrong_key():
            bad = openai.OpenAI(base_url=base, api_key="wrong-" + key, max_retries=0, timeout=60)
            try:
                bad.images.generate(prompt="x", n=1, size=f"{SIZE}x{SIZE}", response_format="b64_json")
            except openai.AuthenticationError as e:
                return f"AuthenticationError {e.status_code}"
            raise AssertionError("a wrong key answered 200")

        checks.run(f"{tag} openai wrong api_key is refused", wrong_key)


# -- main -------------------------------------------------------------------------------------


def run_mode(checks: Checks, args, key: str | None) -> None:
    tag = "[key]" if key else "[open]"
    server = Server(args.binary, args.model, api_key=key, ready_timeout=args.ready_timeout)
    try:
        try:
            server.start()
        except RuntimeError as e:
            checks.failed.append(f"{tag} start")
            print(f"FAIL {tag} server start: {e}", flush=True)
            return
        print(f"PASS {tag} server ready on port {server.port} (pid {server.pid})", flush=True)
        checks.passed += 1

        if key:
            def health_needs_key():
                status, body = get_json(server.port, "/health")
                check(status == 401, f"GET /health without a key answered {status}: {short(body)}")
                return "GET /health without a key -> 401 (probes need the key too)"
            checks.run(f"{tag} auth on /health", health_needs_key)

        webuiapi_checks(checks, server.port, key, tag)
        openai_checks(checks, server.port, key, tag)

        def served():
            h = server.health()
            check(h["failed"] == 0, f"health {h}")
            return f"served={h['served']} cancelled={h['cancelled']} failed={h['failed']}"
        checks.run(f"{tag} /health counters", served)

        def stop():
            code = server.stop(timeout=args.stop_timeout)
            check(code == 0, f"exit status {code} (None: still running after "
                             f"{args.stop_timeout:.0f} s, killed)")
            return f"SIGTERM -> exit 0 within {args.stop_timeout:.0f} s"
        checks.run(f"{tag} server stops on SIGTERM", stop)
    finally:
        if checks.failed:
            print(server.log_tail(), flush=True)
        server.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=DEFAULT_BINARY, help="the server example binary")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model folder")
    p.add_argument("--modes", default="open,key",
                   help="comma-separated: open (no API key), key (--api-key and set_auth)")
    p.add_argument("--api-key", default=None, help="the key for the 'key' mode (random if absent)")
    p.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait for /health")
    p.add_argument("--stop-timeout", type=float, default=10.0, help="seconds to wait for the exit")
    p.add_argument("--strict", action="store_true", help="count GAP lines as failures")
    args = p.parse_args()

    print(f"webuiapi {getattr(webuiapi, '__version__', '?')}, openai {openai.__version__}, "
          f"binary {args.binary}, model {args.model}", flush=True)
    checks = Checks(args.strict)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode == "open":
            run_mode(checks, args, None)
        elif mode == "key":
            run_mode(checks, args, args.api_key or secrets.token_hex(16))
        else:
            p.error(f"unknown mode {mode!r}")
    print(f"{checks.passed} passed, {len(checks.failed)} failed"
          + (f", {len(checks.gaps)} gaps" if checks.gaps else ""), flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
