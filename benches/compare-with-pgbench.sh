#!/usr/bin/env bash
# Runs PostgreSQL's own benchmark beside the PostgreSQL store's, on the same server in the same
# run, and prints the ratios the performance targets are stated in:
#
#   - pgbench -N (simple update) with 16 clients against process_token_usage with 16 callers,
#     and with 64 against 64, each round with the group commit's commits per event, and the
#     ceiling of any group commit of n one-event callers: plain SQL writing what two rounds of
#     n/2 events write, back to back from two clients, with no callers at all;
#   - pgbench -N with one client (median latency per transaction) against one caller (median
#     latency per event);
#   - reserve (a hold for a call in flight) with one caller (median) and with 16 callers, against
#     pgbench -N with one client and with 16;
#   - the rows a batch of 1,000 events writes, written by plain SQL from pgbench with two
#     clients (PostgreSQL's own rate for that work), against process_token_usage_batch with
#     two callers (BATCH_CALLERS changes both).
#
# Usage: benches/compare-with-pgbench.sh   (from the repository root)
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), DATABASE_URL (the test
# database the store benchmark uses), SECONDS_PER_RUN (20), ROUNDS (3), BATCH_CALLERS (2: the
# clients of the plain SQL and the callers of the store's batches, each with 800 users).
set -euo pipefail

export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
export DATABASE_URL="${DATABASE_URL:-postgres://$PGUSER@$PGHOST:$PGPORT/test}"
seconds="${SECONDS_PER_RUN:-20}"
rounds="${ROUNDS:-3}"
export BATCH_CALLERS="${BATCH_CALLERS:-2}"
batch_users=$((BATCH_CALLERS * 800 > 1600 ? BATCH_CALLERS * 800 : 1600))
bench_db=token_billing_pgbench
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$(dirname "$0")/.."

for tool in pgbench psql python3 cargo; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done

echo "== pgbench database ($bench_db, scale 10)"
PGOPTIONS="-c client_min_messages=warning" psql -qAt -d postgres -c "DROP DATABASE IF EXISTS $bench_db" >/dev/null
psql -qAt -d postgres -c "CREATE DATABASE $bench_db" >/dev/null
pgbench -q -i -s 10 "$bench_db" >/dev/null 2>&1

checkpoint() { psql -qAt -d "$bench_db" -c CHECKPOINT >/dev/null; }

# The store's schema, in a schema of its own, with the users' periods open: the plain SQL below
# writes the rows the store writes.
PGOPTIONS="-c client_min_messages=warning" psql -qAt -d "$bench_db" -c "DROP SCHEMA IF EXISTS token_billing_floor CASCADE; CREATE SCHEMA token_billing_floor" >/dev/null
for migration in migrations/*.sql; do
    PGOPTIONS="-c search_path=token_billing_floor -c client_min_messages=warning" psql -qAt -v ON_ERROR_STOP=1 -d "$bench_db" -f "$migration" >/dev/null
done
PGOPTIONS="-c search_path=token_billing_floor" psql -qAt -d "$bench_db" -c "
    INSERT INTO token_usage_summary (user_id, period, currency, total_tokens, events, updated_at)
    SELECT 'user-' || u, '2026-11', 'BRL', 8000000, 1, now() FROM generate_series(0, $((batch_users - 1))) AS u" >/dev/null

# The ceiling of any group commit of n callers, each with one event in flight: PostgreSQL
# writing, with no callers at all, what two rounds of n/2 events write (as many period totals
# moved and consumptions inserted, in one statement and one commit), from two clients on users
# of their own, back to back.
cat >"$work/round.sql" <<'SQL'
\set base :client_id * 800 + random(0, 800 - :size)
WITH u AS (SELECT 'user-' || (:base + g) AS user_id FROM generate_series(0, :size - 1) AS g),
moved AS (
    UPDATE token_usage_summary s SET total_tokens = total_tokens + 1000, events = events + 1, updated_at = now()
      FROM u WHERE s.user_id = u.user_id AND s.period = '2026-11'
    RETURNING s.user_id
), inserted AS (
    INSERT INTO token_consumption (user_id, id, event_id, period, tokens_used, operation_type, metadata, occurred_at,
                                   occurred_at_reported, created_at, total_before, created_fee, first_block, end_block,
                                   audit_seq)
    SELECT m.user_id, gen_random_uuid(), gen_random_uuid()::text, '2026-11', 1000, 'chat',
           '{"agentId": "agent-456", "conversationId": "conv-123", "model": "gpt-large"}', now(), false, now(),
           8000000, false, 1, 1, nextval('token_billing_audit_seq_seq')
      FROM moved m
    RETURNING 1
)
SELECT count(*) FROM inserted;
SQL
# Events a second of two such clients writing rounds of $1 events for $seconds seconds.
ceiling() {
    local tps
    tps=$(PGOPTIONS="-c search_path=token_billing_floor" pgbench -n -M prepared -c 2 -j 2 -D size="$1" -T "$seconds" \
        -f "$work/round.sql" "$bench_db" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    python3 -c "print($tps * $1)"
}
criterion_median_ns() {
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['median']['point_estimate'])" \
        "target/criterion/$1/new/estimates.json"
}
store_bench() { cargo bench --features postgres --bench postgres -- "$1" >"$work/store.txt" 2>&1; }

pgbench_tps() { pgbench -N -c "$1" -j 2 -T "$seconds" "$bench_db" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'; }

# Throughput moves by a quarter between runs minutes apart on a shared machine: alternate the
# three, each after a checkpoint, and compare round by round.
# alternate N NAME PGBENCH STORE CEILING: ROUNDS times pgbench -N with N clients, the ceiling of
# N one-event callers and the store's postgres_one_event/NAME; appends to the arrays named.
alternate() {
    local callers=$1 name=$2
    local -n pgs=$3 ours=$4 tops=$5
    echo "== $callers clients against $callers callers, ${rounds} rounds of pgbench -N (${seconds}s), the ceiling, then the store"
    for round in $(seq 1 "$rounds"); do
        checkpoint
        pgs+=("$(pgbench_tps "$callers")")
        checkpoint
        tops+=("$(ceiling $((callers / 2)))")
        checkpoint
        store_bench "postgres_one_event/$name\$"
        ours+=("$(python3 -c "print(1e9 / $(criterion_median_ns "postgres_one_event/$name"))")")
        printf '   round %d: pgbench %8.0f tps, ceiling %8.0f events/s, store %8.0f events/s; %s\n' "$round" "${pgs[-1]}" \
            "${tops[-1]}" "${ours[-1]}" "$(sed -n "s/.*$name commits per event: \([0-9.]*\).*/\1 commits per event/p" "$work/store.txt" | tail -1)"
    done
}
pg16s=() ours16s=() ceilings=() pg64s=() ours64s=() ceilings64=()
alternate 16 sixteen_callers pg16s ours16s ceilings
alternate 64 sixty_four_callers pg64s ours64s ceilings64

echo "== one client against one caller"
checkpoint
(cd "$work" && pgbench -N -c 1 -T "$seconds" --log --log-prefix=one "$bench_db" >/dev/null 2>&1)
pg1=$(cat "$work"/one.* | awk '{print $3}' | sort -n | awk '{v[NR]=$1} END {print v[int(NR/2)+1]}')
checkpoint
store_bench 'postgres_one_event/one_caller$'
ours1=$(sed -n 's/.*latency per event: median \([0-9]*\) us.*/\1/p' "$work/store.txt" | tail -1)
echo "   pgbench median $pg1 us per transaction, store median $ours1 us per event"

echo "== reserve: one caller against pgbench's one client (above), then 16 callers against 16 clients"
checkpoint
store_bench 'postgres_reserve/one_caller$'
reserve1=$(sed -n 's/.*postgres_reserve\/one_caller latency per event: median \([0-9]*\) us.*/\1/p' "$work/store.txt" | tail -1)
checkpoint
pg16r=$(pgbench_tps 16)
checkpoint
store_bench 'postgres_reserve/sixteen_callers$'
reserve16=$(python3 -c "print(1e9 / $(criterion_median_ns postgres_reserve/sixteen_callers))")
printf '   one caller median %s us; 16 callers %.0f reserves/s against pgbench %.0f tps\n' "$reserve1" "$reserve16" "$pg16r"

echo "== plain SQL writing what a batch of 1,000 events writes, $BATCH_CALLERS clients, ${seconds}s"
checkpoint
# Each client writes its own 800 users, as each of the store benchmark's callers does:
# 1,000 consumptions (with the same metadata, each given its place in the audit trail) and the
# totals of the 800 periods they belong to, in one transaction.
cat >"$work/batch.sql" <<'SQL'
\set own :client_id % :callers
BEGIN;
UPDATE token_usage_summary SET total_tokens = total_tokens + 1000 * (1 + (u.n < 200)::int),
       events = events + 1 + (u.n < 200)::int, updated_at = now()
  FROM (SELECT n, 'user-' || (:own + :callers * n) AS user_id FROM generate_series(0, 799) AS n) AS u
 WHERE token_usage_summary.user_id = u.user_id AND token_usage_summary.period = '2026-11';
INSERT INTO token_consumption (user_id, id, event_id, period, tokens_used, operation_type, metadata, occurred_at,
                               occurred_at_reported, created_at, total_before, created_fee, first_block, end_block,
                               audit_seq)
SELECT 'user-' || (:own + :callers * (i % 800)), gen_random_uuid(), gen_random_uuid()::text, '2026-11', 1000, 'chat',
       '{"agentId": "agent-456", "conversationId": "conv-123", "model": "gpt-large"}', now(), false, now(),
       8000000, false, 1, 1, nextval('token_billing_audit_seq_seq')
  FROM generate_series(0, 999) AS i;
COMMIT;
SQL
floor_tps=$(PGOPTIONS="-c search_path=token_billing_floor" pgbench -n -c "$BATCH_CALLERS" -j "$((BATCH_CALLERS < 2 ? BATCH_CALLERS : 2))" -D callers="$BATCH_CALLERS" -T "$seconds" -f "$work/batch.sql" "$bench_db" 2>/dev/null \
    | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
floor=$(python3 -c "print(round($floor_tps * 1000))")
echo "   $floor events/s"
echo "== the store's batches"
checkpoint
store_bench 'postgres_batch'
if [ "$BATCH_CALLERS" = 2 ]; then batch_name=batches_of_1000_two_callers; else batch_name="batches_of_1000_${BATCH_CALLERS}_callers"; fi
batch=$(python3 -c "print(1000 * 1e9 / $(criterion_median_ns "postgres_batch/$batch_name"))")
psql -qAt -d postgres -c "DROP DATABASE $bench_db" >/dev/null

python3 - "$pg1" "$ours1" "$floor" "$batch" "${pg16s[*]}" "${ours16s[*]}" "$reserve1" "$reserve16" "$pg16r" "${pg64s[*]}" "${ours64s[*]}" "${ceilings[*]}" "${ceilings64[*]}" <<'PY'
import statistics, sys
pg1, ours1, floor, batch = (float(v) for v in sys.argv[1:5])
pg16 = [float(v) for v in sys.argv[5].split()]
ours16 = [float(v) for v in sys.argv[6].split()]
reserve1, reserve16, pg16r = (float(v) for v in sys.argv[7:10])
pg64 = [float(v) for v in sys.argv[10].split()]
ours64 = [float(v) for v in sys.argv[11].split()]
ceilings = [float(v) for v in sys.argv[12].split()]
ceilings64 = [float(v) for v in sys.argv[13].split()]
print()
for callers, ours, pg, target in ((16, ours16, pg16, 3.0), (64, ours64, pg64, 5.0)):
    ratios = [o / p for o, p in zip(ours, pg)]
    print(f"{callers} callers:  ratios by round " + ", ".join(f"{r:.2f}" for r in ratios)
          + f"; median {statistics.median(ratios):.2f} (target >= {target:.2f})")
for callers, ours, pg, tops in ((16, ours16, pg16, ceilings), (64, ours64, pg64, ceilings64)):
    print(f"{callers} callers:  the ceiling (plain SQL, two rounds of {callers // 2} at once, no callers) by round "
          + ", ".join(f"{c / p:.2f}" for c, p in zip(tops, pg)) + " x pgbench; the store reached "
          + ", ".join(f"{o / c:.0%}" for o, c in zip(ours, tops)) + " of it")
print(f"1 caller:    {ours1:8.0f} us median vs pgbench -N 1 client {pg1:8.0f} us: ratio {ours1 / pg1:.2f} (target <= 0.60)")
print(f"reserve, 1:  {reserve1:8.0f} us median vs pgbench -N 1 client {pg1:8.0f} us: ratio {reserve1 / pg1:.2f} (target <= 1.00)")
print(f"reserve, 16: {reserve16:8.0f} reserves/s vs pgbench -N 16 clients {pg16r:8.0f} tps: ratio {reserve16 / pg16r:.2f} (target >= 1.00)")
print(f"batches:     {batch:8.0f} events/s vs plain SQL, same rows {floor:8.0f} events/s: ratio {batch / floor:.2f}"
      " (target 50000 events/s)")
PY
