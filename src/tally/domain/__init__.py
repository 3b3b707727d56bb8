"""Tally's domain: the rules of credits, with no I/O.

Words (docs/rules.md §1): an **account** owns **lots** (credits of one origin and
validity); a **hold** reserves credits for a job and is `pending` until `captured`,
`released` or `expired`; an **entry** is one immutable journal row saying why credits moved.

Where credits live. A credit granted to an account is, at every instant, in exactly one place:
a lot's `remaining`, a pending hold's allocation, or gone (captured, debited, expired, voided,
clawed back). Debt is the other side: credits that were spent and then taken back (a
chargeback) and which the next grant repays first.

Entry signs. `amount` is positive for every type except `adjustment`:

==========  ====================  ==========================================================
type        with lot_id           without lot_id
==========  ====================  ==========================================================
grant       lot.remaining += a    never
hold        lot.remaining -= a    never (always has lot_id and hold_id)
release     lot.remaining += a    never (always has lot_id and hold_id)
capture     hold keeps a          never (always has lot_id and hold_id); remaining unchanged
debit       lot.remaining -= a    never
expire      lot.remaining -= a    never
void        lot.remaining -= a    never
clawback    lot.remaining -= a    debt += a   (credits already spent are now owed)
adjustment  lot.remaining += a    debt -= a   (signed: the change to what the account has)
==========  ====================  ==========================================================

Invariants (rule 6), proven by `tally check` against the database:
  * per lot: remaining = grants - holds + releases - debits - expires - voids - clawbacks
    + adjustments, and 0 <= remaining <= amount;
  * per hold: hold entries = captures + releases, plus the allocation while pending;
    a captured hold captured exactly `captured`;
  * per account: debt = clawbacks - adjustments (entries without a lot); entries are
    numbered 1..entry_seq with no gap.

Why the journal is append-only. Balances are a projection that can be rebuilt, audited and
read in constant time; the journal is the evidence. Updating or deleting an entry would let a
bug or an operator change history without a trace, so the database refuses it (triggers on
both SQLite and PostgreSQL), and corrections are new entries (`void`, `clawback`,
`adjustment`) that say why.

Time. Expiry is a fact of the clock, not of the sweep: a lot past `expires_at` counts as zero
and a pending hold past its TTL counts as released the moment they fall due. The sweep (and
any later change to the account) only writes down what time already decided.
"""
