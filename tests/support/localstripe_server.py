"""Runs localstripe (a stateful Stripe-compatible server) for token-billing's tests.

localstripe lacks three things of Stripe's API that the Stripe gateway relies on; this launcher
adds them, the way Stripe documents them, so that the gateway's own code paths run against a
stateful server:

- Idempotency-Key: a POST re-sent with a key already used is answered with the first answer
  (and `Idempotent-Replayed: true`); with other parameters, 400 `idempotency_error`; while the
  first is still running, 409. Stripe keeps keys 24 hours: `POST /_config/idempotency/forget`
  with `contains=<text>` forgets the keys containing the text, as if they had expired.
- `GET /v1/payment_intents/search` for queries of the form `metadata['key']:'value'`.
- `description` on PaymentIntents.

It also binds to the address given (127.0.0.1 by default) instead of every interface, keeps
nothing on disk, and with `--exit-with-parent` stops when the process that started it ends.

    python localstripe_server.py --host 127.0.0.1 --port 8420 [--exit-with-parent]
"""

import argparse
import asyncio
import json
import os
import re
import sys

from aiohttp import web

from localstripe import resources, server

# Nothing is kept on disk: localstripe pickles its whole store on every write otherwise.
resources.Store.dump_to_disk = lambda self: None


# --- description on PaymentIntents -----------------------------------------------------------

_payment_intent_init = resources.PaymentIntent.__init__


def _payment_intent_with_description(self, description=None, **kwargs):
    if description is not None and not isinstance(description, str):
        raise resources.UserError(400, 'Bad request')
    _payment_intent_init(self, **kwargs)
    self.description = description


resources.PaymentIntent.__init__ = _payment_intent_with_description


# --- Idempotency-Key ---------------------------------------------------------------------------

class IdempotencyKeys:
    def __init__(self):
        self.done = {}  # key -> (method, path, body, status, headers, response body)
        self.running = set()

    def forget(self, contains):
        for key in [k for k in self.done if contains in k]:
            del self.done[key]


keys = IdempotencyKeys()


def stripe_error(status, kind, message, code=None):
    error = {'type': kind, 'message': message}
    if code is not None:
        error['code'] = code
    return web.json_response({'error': error}, status=status)


@web.middleware
async def idempotency_middleware(request, handler):
    key = request.headers.get('Idempotency-Key')
    if request.method != 'POST' or key is None or request.path.startswith('/_config/'):
        return await handler(request)
    body = await request.read()
    seen = keys.done.get(key)
    if seen is not None:
        method, path, first_body, status, content_type, text = seen
        if (method, path, first_body) != (request.method, request.path, body):
            return stripe_error(
                400, 'idempotency_error',
                'Keys for idempotent requests can only be used with the same parameters they were '
                'first used with.')
        response = web.Response(status=status, text=text, content_type=content_type)
        response.headers['Idempotent-Replayed'] = 'true'
        return response
    if key in keys.running:
        return stripe_error(
            409, 'idempotency_error',
            'There is currently another in-progress request using this Idempotent Key.',
            'idempotency_key_in_use')
    keys.running.add(key)
    try:
        try:
            response = await handler(request)
        except resources.UserError as error:
            # localstripe raises its API errors; answer them here so that they are kept too.
            response = error.to_response()
    finally:
        keys.running.discard(key)
    # Stripe keeps the answer of a request that began executing: successes, declines and server
    # errors, not the validation errors it refuses before executing.
    if response.status < 300 or response.status == 402 or response.status >= 500:
        keys.done[key] = (request.method, request.path, body, response.status,
                          response.content_type, response.text)
    return response


async def forget_keys(request):
    data = await request.post()
    contains = data.get('contains', '')
    if not contains:
        return stripe_error(400, 'invalid_request_error', 'contains is required')
    keys.forget(contains)
    return web.Response()


# --- search -------------------------------------------------------------------------------------

METADATA_QUERY = re.compile(r"^metadata\['((?:[^'\\]|\\.)+)'\]:'((?:[^'\\]|\\.)*)'$")


def unescape(text):
    return re.sub(r'\\(.)', r'\1', text)


@web.middleware
async def search_middleware(request, handler):
    if request.method != 'GET' or request.path != '/v1/payment_intents/search':
        return await handler(request)
    match = METADATA_QUERY.match(request.query.get('query', ''))
    if match is None:
        return stripe_error(400, 'invalid_request_error',
                            "only metadata['key']:'value' queries are supported here")
    name, value = unescape(match.group(1)), unescape(match.group(2))
    try:
        limit = int(request.query.get('limit', '10'))
        start = int(request.query.get('page', '0'))
    except ValueError:
        return stripe_error(400, 'invalid_request_error', 'bad limit or page')
    if not 1 <= limit <= 100 or start < 0:
        return stripe_error(400, 'invalid_request_error', 'bad limit or page')
    found = sorted(
        (obj for key, obj in list(resources.store.items())
         if key.startswith('payment_intent:') and (obj.metadata or {}).get(name) == value),
        key=lambda obj: (-obj.created, obj.id))
    page = found[start:start + limit]
    more = start + limit < len(found)
    return web.json_response({
        'object': 'search_result',
        'url': '/v1/payment_intents/search',
        'data': [obj._export() for obj in page],
        'has_more': more,
        'next_page': str(start + limit) if more else None,
    })


# --- running ------------------------------------------------------------------------------------

async def exit_with_parent(parent):
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    os._exit(0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=8420)
    parser.add_argument('--exit-with-parent', action='store_true')
    args = parser.parse_args()

    app = server.app
    app.middlewares.append(idempotency_middleware)
    app.middlewares.append(search_middleware)
    app.router.add_post('/_config/idempotency/forget', forget_keys)

    if args.exit_with_parent:
        parent = os.getppid()

        async def watch(app):
            app['watchdog'] = asyncio.ensure_future(exit_with_parent(parent))

        app.on_startup.append(watch)

    print(f'localstripe listening on http://{args.host}:{args.port}', file=sys.stderr, flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == '__main__':
    main()
