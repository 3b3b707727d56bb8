#!/usr/bin/env bash
# `make run`: migrate the database (SQLite under ./var by default), make a demo platform key on
# first run, and serve the API with the worker in-process.
set -euo pipefail
tally=".venv/bin/tally"
port="${TALLY_PORT:-8000}"
# Links in emails and the sandbox's own webhook point here.
export TALLY_PUBLIC_URL="${TALLY_PUBLIC_URL:-http://127.0.0.1:${port}}"
mkdir -p var
$tally migrate
if [ ! -s var/demo.key ]; then
    umask 077
    $tally platforms create demo --scopes read,spend,grant,support | tail -n 1 > var/demo.key
fi
key="$(cat var/demo.key)"
cat <<INFO

  Tally is starting on http://127.0.0.1:${port}
  API docs:      http://127.0.0.1:${port}/docs
  Buy (sandbox): http://127.0.0.1:${port}/checkout/pro
  Mailbox:       http://127.0.0.1:${port}/dev/mailbox
  Redeem:        http://127.0.0.1:${port}/redeem
  Lost code:     http://127.0.0.1:${port}/lost-code
  Support:       http://127.0.0.1:${port}/admin   (make a staff member: .venv/bin/tally staff create EMAIL)
  Demo API key:  ${key}   (also in var/demo.key)

  Try it:
    curl -s -X POST http://127.0.0.1:${port}/v1/accounts/alice/grants \\
      -H "Authorization: Bearer ${key}" -H "Idempotency-Key: first-grant" \\
      -H "Content-Type: application/json" -d '{"amount": 10, "reason": "welcome"}'
    curl -s http://127.0.0.1:${port}/v1/accounts/alice/balance -H "Authorization: Bearer ${key}"

INFO
exec $tally serve --port "$port"
