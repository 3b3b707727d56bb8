#!/usr/bin/env bash
# A five-minute tour of the ledger on the configured database (SQLite under ./var by default).
set -euo pipefail
tally=".venv/bin/tally"
person="tour-$(date +%s)@example.com"
field() { .venv/bin/python -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }

echo "== $person buys Pro: 25 purchased credits, valid two years"
$tally grant "$person" 25 --source purchase --reason "Pro package" >/dev/null
echo "== and gets 5 promotional credits that expire in 7 days (spent first: soonest expiry)"
$tally grant "$person" 5 --valid-for P7D --reason "welcome bonus" >/dev/null
echo "== a portrait job holds 4 credits (4 images at 1 credit each)"
hold_id=$($tally hold "$person" 4 | field id)
echo "== the tool delivered 3 images: capture 3, the 4th credit goes back"
$tally capture "$hold_id" --amount 3 >/dev/null
echo "== a video job fails: its hold is released in full"
failed=$($tally hold "$person" 2 | field id)
$tally release "$failed" --reason "generation failed" >/dev/null
echo "== a logo costs 1 credit, spent in one step"
$tally debit "$person" 1 >/dev/null
echo "== the balance"
$tally balance "$person"
echo "== the journal explains every credit"
$tally entries "$person" --limit 50 | .venv/bin/python -c '
import json, sys
for e in reversed(json.load(sys.stdin)):
    print("  #%-3d %-10s %4d  %s" % (e["seq"], e["type"], e["amount"], e["reason"] or ""))'
echo "== conservation audit"
$tally check
