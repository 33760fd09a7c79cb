-- idemgate's PostgreSQL schema, version 4. `{schema}` is replaced by the
-- configured schema name (quoted), `{channel}` by the waiters' channel and
-- `{replays}` by the replay caches' invalidation channel.
--
-- Every statement here can run again on an older schema: that is how one
-- is migrated. Version 1 ran begin_many and complete_many as loops of
-- one-key calls; version 2 had no step_many; version 3's step_many called
-- complete_many and begin_many, which now call it (builds before version
-- 4 still call them during a rolling upgrade).
--
-- Every transition of the storage contract is one function call: one
-- statement, one transaction, the row locked for no longer than that. The
-- database's clock decides lease ends and expiry (`now()`, as milliseconds
-- since the epoch); fences come from one sequence, so they rise strictly
-- per key across expiry, release and purge (a sequence never goes back,
-- not even after a crash or a failover: its WAL runs ahead of it).
-- A row past `expires_ms` is absent to every function; the sweeper deletes
-- such rows in small batches.

CREATE SCHEMA IF NOT EXISTS {schema};

CREATE SEQUENCE IF NOT EXISTS {schema}.fences;

-- HTTP records. state: 'i' in flight, 'c' completed, 'u' unknown.
CREATE TABLE IF NOT EXISTS {schema}.records (
    key bytea PRIMARY KEY,
    state "char" NOT NULL,
    token text,
    fence bigint NOT NULL,
    fp bytea,
    lease_until_ms bigint,
    record bytea,
    cause text,
    since_ms bigint,
    next_ms bigint,
    expires_ms bigint NOT NULL,
    -- Some replica waits for this lease to settle: its settlement notifies.
    -- Only then, because a transaction that notifies holds one lock for
    -- the whole database from its commit until its WAL is flushed: every
    -- completion notifying would commit one at a time.
    waited boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS records_expires ON {schema}.records (expires_ms);

-- Fair-share buckets, one per caller scope.
CREATE TABLE IF NOT EXISTS {schema}.buckets (
    scope bytea PRIMARY KEY,
    tokens double precision NOT NULL,
    at_ms bigint NOT NULL,
    expires_ms bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS buckets_expires ON {schema}.buckets (expires_ms);

-- Consumer dedup. state: 'l' leased, 'p' pending, 'c' completed, 'f'
-- failed (a dead letter), 'm' marked.
CREATE TABLE IF NOT EXISTS {schema}.dedup (
    scope text NOT NULL,
    key bytea NOT NULL,
    state "char" NOT NULL,
    lease_id text,
    fence bigint,
    attempts integer,
    lease_until_ms bigint,
    fp bytea,
    worker bytea,
    result bytea,
    error bytea,
    at_ms bigint,
    expires_ms bigint NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS dedup_expires ON {schema}.dedup (expires_ms);
CREATE INDEX IF NOT EXISTS dedup_failed ON {schema}.dedup (scope, at_ms, key) WHERE state = 'f';

CREATE OR REPLACE FUNCTION {schema}.now_ms() RETURNS bigint
LANGUAGE sql STABLE AS $$ SELECT floor(extract(epoch FROM now()) * 1000)::bigint $$;

-- begin: take the lease of an absent key, or report what holds it.
-- hold_ms NULL: a lapsed lease is taken over; else it becomes unknown
-- (cause 'lapsed') for hold_ms. reconcile_ms NULL: no reconciling.
-- kind: 'a' acquired (fence) | 'i' in flight (fence, fp) | 'c' completed
-- (record, ttl_ms) | 'u' unknown (fence, fp, cause, since_ms, next_ms,
-- reconcile, held_now).
CREATE OR REPLACE FUNCTION {schema}.begin_lease(
    k bytea, tok text, given_fp bytea, lease_ms bigint, in_flight_ms bigint,
    hold_ms bigint, reconcile_ms bigint)
RETURNS TABLE (kind "char", fence bigint, fp bytea, record bytea, ttl_ms bigint,
    cause text, since_ms bigint, next_ms bigint, reconcile boolean, held_now boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t bigint := {schema}.now_ms();
    r {schema}.records;
    lapsed boolean := false;
    f bigint;
BEGIN
    -- Most begins change nothing: a replay, a duplicate while the lease is
    -- held, an unknown record not due a reconcile. Those read without a
    -- lock: a row lock is a write (a transaction id, WAL, a flush at
    -- commit) and would queue every replay of one key behind the others.
    SELECT * INTO r FROM {schema}.records AS x WHERE x.key = k;
    IF FOUND AND r.expires_ms > t THEN
        IF r.state = 'c' THEN
            RETURN QUERY SELECT 'c'::"char", r.fence, NULL::bytea, r.record, r.expires_ms - t,
                NULL::text, NULL::bigint, NULL::bigint, false, false;
            RETURN;
        END IF;
        IF r.state = 'i' AND r.lease_until_ms > t THEN
            RETURN QUERY SELECT 'i'::"char", r.fence, r.fp, NULL::bytea, NULL::bigint,
                NULL::text, NULL::bigint, NULL::bigint, false, false;
            RETURN;
        END IF;
        IF r.state = 'u' AND (reconcile_ms IS NULL OR t < r.next_ms) THEN
            RETURN QUERY SELECT 'u'::"char", r.fence, r.fp, NULL::bytea, NULL::bigint,
                r.cause, r.since_ms, r.next_ms, false, false;
            RETURN;
        END IF;
    END IF;
    -- A change to make: the row locked, every case decided again on it.
    LOOP
        SELECT * INTO r FROM {schema}.records AS x WHERE x.key = k FOR UPDATE;
        IF NOT FOUND THEN
            f := nextval('{schema}.fences');
            INSERT INTO {schema}.records AS x (key, state, token, fence, fp, lease_until_ms, expires_ms)
                VALUES (k, 'i', tok, f, given_fp, t + lease_ms, t + in_flight_ms)
                ON CONFLICT DO NOTHING;
            IF FOUND THEN
                RETURN QUERY SELECT 'a'::"char", f, NULL::bytea, NULL::bytea, NULL::bigint,
                    NULL::text, NULL::bigint, NULL::bigint, false, false;
                RETURN;
            END IF;
            CONTINUE; -- another begin inserted it first: read and lock it
        END IF;
        EXIT;
    END LOOP;
    IF r.expires_ms > t THEN
        IF r.state = 'i' AND r.lease_until_ms > t THEN
            RETURN QUERY SELECT 'i'::"char", r.fence, r.fp, NULL::bytea, NULL::bigint,
                NULL::text, NULL::bigint, NULL::bigint, false, false;
            RETURN;
        END IF;
        IF r.state = 'c' THEN
            RETURN QUERY SELECT 'c'::"char", r.fence, NULL::bytea, r.record, r.expires_ms - t,
                NULL::text, NULL::bigint, NULL::bigint, false, false;
            RETURN;
        END IF;
        IF r.state = 'i' AND hold_ms IS NOT NULL THEN
            -- The holder stopped renewing after it forwarded: the request
            -- may have run. Hold the key as unknown rather than run it again.
            UPDATE {schema}.records AS x SET state = 'u', token = NULL, lease_until_ms = NULL,
                cause = 'lapsed', since_ms = t, next_ms = 0, expires_ms = t + hold_ms,
                waited = false
                WHERE x.key = k;
            IF r.waited THEN
                PERFORM pg_notify('{channel}', encode(k, 'hex'));
            END IF;
            r.state := 'u'; r.cause := 'lapsed'; r.since_ms := t; r.next_ms := 0;
            lapsed := true;
        END IF;
        IF r.state = 'u' THEN
            IF reconcile_ms IS NOT NULL AND t >= r.next_ms THEN
                UPDATE {schema}.records AS x SET next_ms = t + reconcile_ms WHERE x.key = k;
                RETURN QUERY SELECT 'u'::"char", r.fence, r.fp, NULL::bytea, NULL::bigint,
                    r.cause, r.since_ms, t + reconcile_ms, true, lapsed;
                RETURN;
            END IF;
            RETURN QUERY SELECT 'u'::"char", r.fence, r.fp, NULL::bytea, NULL::bigint,
                r.cause, r.since_ms, r.next_ms, false, lapsed;
            RETURN;
        END IF;
    END IF;
    -- Expired, or a lapsed lease taken over: a new lease, a higher fence.
    f := nextval('{schema}.fences');
    UPDATE {schema}.records AS x SET state = 'i', token = tok, fence = f, fp = given_fp,
        lease_until_ms = t + lease_ms, record = NULL, cause = NULL, since_ms = NULL,
        next_ms = NULL, expires_ms = t + in_flight_ms, waited = false
        WHERE x.key = k;
    -- Waiters of the lapsed lease begin again now rather than at their
    -- next re-check.
    IF r.waited AND r.state = 'i' THEN
        PERFORM pg_notify('{channel}', encode(k, 'hex'));
    END IF;
    RETURN QUERY SELECT 'a'::"char", f, NULL::bytea, NULL::bytea, NULL::bigint,
        NULL::text, NULL::bigint, NULL::bigint, false, false;
END
$$;

-- step_many: the completions and the begins gathered while the previous
-- batch ran, in one transaction: one round trip and one commit (one WAL
-- flush) for both kinds. Completions go first, so a begin of a key the
-- same batch completes finds it completed. Rows: a begin's (i its
-- position, `done` NULL; kind 'a' acquired, or begin_lease's answer); a
-- completion's i is minus its position, with `done`. Either array may be
-- empty. The work is written out here, not called from complete_many and
-- begin_many: each call of a function is an executor started, its SET
-- clauses applied and undone (0.03–0.07 ms a batch, benches/RESULTS.md).
--
-- Completions: one UPDATE reaching its rows by `key = ANY` on the primary
-- key, which walks the index in key order (rows are locked in key order,
-- as the begins lock them); each row finds its element by its lease's
-- token (128 random bits: one element at most holds it; a key given
-- twice, by a lapsed holder and by the one that took over, matches only
-- the current one). An element is done when its key now holds its
-- record. Settlements notify only where a duplicate waits (see `waited`).
--
-- Begins: most keys of a batch are new, and one INSERT takes them all
-- (the first of a key given twice) with no row lock and no function call
-- per key. Keys with a row are left out of it: drawing a fence for them
-- would write (the sequence), so a batch of replays would wait for a WAL
-- flush. A row inserted meanwhile by another batch is the insert's
-- conflict. An inserted row is its element's by its token. The keys the
-- insert did not take (present, inserted by another batch meanwhile, or
-- repeated) are read in one statement, in key order: a completed record
-- is answered from that read, as begin_lease's read without a lock would
-- (a batch of replays makes no call per key); begin_lease decides the
-- others, and only locks rows that were present before the insert (or
-- that it waited for). Locks: the completions', then the begins', each
-- in key order. Two batches could only wait on each other in a cycle
-- where two leases lapsed and were taken over while their holders
-- completed them, crosswise, at once; PostgreSQL then fails one of them,
-- and its callers get the store's error.
--
-- The statements are planned once per connection, as a generic plan,
-- whatever the batch's size (a plan made for each call cost more than
-- running it). The plan must not depend on the table's size when it was
-- made: a join planned while the table was small (a hash join, a merge
-- join or a bitmap scan over it) would stay while it grows. Hence the SET
-- clauses (a join is a nested loop over the input) and `expires_ms + 0`
-- (the expiry index cannot serve the update; a plan made while the table
-- was empty chose a range scan of it, every live row): every key is one
-- probe of the primary key.
CREATE OR REPLACE FUNCTION {schema}.step_many(ks bytea[], toks text[], fps bytea[],
    lease_ms bigint[], in_flight_ms bigint[], hold_ms bigint[], reconcile_ms bigint[],
    cks bytea[], ctoks text[], crecs bytea[], cttls bigint[])
RETURNS TABLE (i integer, kind "char", fence bigint, fp bytea, record bytea, ttl_ms bigint,
    cause text, since_ms bigint, next_ms bigint, reconcile boolean, held_now boolean,
    done boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    t bigint := {schema}.now_ms();
    taken bigint;
    j integer;
    st "char";
    f bigint;
    rec bytea;
    ends bigint;
BEGIN
    IF cardinality(cks) > 0 THEN
        RETURN QUERY
        WITH up AS (
            UPDATE {schema}.records AS x SET state = 'c', token = NULL, fp = NULL,
                lease_until_ms = NULL, record = crecs[array_position(ctoks, x.token)],
                expires_ms = t + cttls[array_position(ctoks, x.token)]
            WHERE x.key = ANY (cks) AND x.state = 'i' AND x.token = ANY (ctoks)
                AND cks[array_position(ctoks, x.token)] = x.key AND x.expires_ms + 0 > t
            RETURNING x.key, x.record, x.waited),
        woken AS (
            SELECT count(pg_notify('{channel}', encode(up.key, 'hex'))) AS n
            FROM up WHERE up.waited)
        SELECT -g.o::integer, NULL::"char", NULL::bigint, NULL::bytea, NULL::bytea,
            NULL::bigint, NULL::text, NULL::bigint, NULL::bigint, NULL::boolean,
            NULL::boolean,
            EXISTS (SELECT FROM up WHERE up.key = cks[g.o] AND up.record = crecs[g.o])
        FROM generate_subscripts(cks, 1) AS g(o), woken;
    END IF;
    IF cardinality(ks) > 0 THEN
        RETURN QUERY
        WITH ins AS (
            INSERT INTO {schema}.records AS x (key, state, token, fence, fp, lease_until_ms,
                expires_ms)
            SELECT u.k, 'i', u.tok, nextval('{schema}.fences'), u.fp, t + u.l, t + u.f
            FROM (SELECT DISTINCT ON (v.k) v.k, v.tok, v.fp, v.l, v.f
                  FROM unnest(ks, toks, fps, lease_ms, in_flight_ms) WITH ORDINALITY
                      AS v(k, tok, fp, l, f, o)
                  WHERE NOT EXISTS (SELECT FROM {schema}.records AS y WHERE y.key = v.k)
                  ORDER BY v.k, v.o) AS u
            ORDER BY u.k
            ON CONFLICT DO NOTHING
            RETURNING x.token, x.fence)
        SELECT array_position(toks, ins.token), 'a'::"char", ins.fence, NULL::bytea,
            NULL::bytea, NULL::bigint, NULL::text, NULL::bigint, NULL::bigint, false, false,
            NULL::boolean
        FROM ins;
        GET DIAGNOSTICS taken = ROW_COUNT;
        -- The common batch ends here: every key was new. Of the others,
        -- a completed record is answered from the row read here (as
        -- begin_lease's read without a lock would), the rest by
        -- begin_lease.
        IF taken < cardinality(ks) THEN
            FOR j, st, f, rec, ends IN
                SELECT v.o, y.state, y.fence, y.record, y.expires_ms
                FROM unnest(ks, toks) WITH ORDINALITY AS v(k, tok, o)
                    LEFT JOIN {schema}.records AS y ON y.key = v.k
                WHERE y.key IS NULL OR y.state <> 'i' OR y.token IS DISTINCT FROM v.tok
                ORDER BY v.k, v.o
            LOOP
                IF st = 'c' AND ends > t THEN
                    i := j; kind := 'c'; fence := f; fp := NULL; record := rec;
                    ttl_ms := ends - t; cause := NULL; since_ms := NULL; next_ms := NULL;
                    reconcile := false; held_now := false; done := NULL;
                    RETURN NEXT;
                ELSE
                    RETURN QUERY SELECT j, b.*, NULL::boolean FROM {schema}.begin_lease(ks[j],
                        toks[j], fps[j], lease_ms[j], in_flight_ms[j], hold_ms[j],
                        reconcile_ms[j]) AS b;
                END IF;
            END LOOP;
        END IF;
    END IF;
END
$$;

-- begin_many and complete_many: step_many with one kind. This build calls
-- step_many alone; these answer the builds before version 4.
CREATE OR REPLACE FUNCTION {schema}.begin_many(ks bytea[], toks text[], fps bytea[],
    lease_ms bigint[], in_flight_ms bigint[], hold_ms bigint[], reconcile_ms bigint[])
RETURNS TABLE (i integer, kind "char", fence bigint, fp bytea, record bytea, ttl_ms bigint,
    cause text, since_ms bigint, next_ms bigint, reconcile boolean, held_now boolean)
LANGUAGE sql
AS $$
    SELECT s.i, s.kind, s.fence, s.fp, s.record, s.ttl_ms, s.cause, s.since_ms, s.next_ms,
        s.reconcile, s.held_now
    FROM {schema}.step_many(ks, toks, fps, lease_ms, in_flight_ms, hold_ms, reconcile_ms,
        '{}'::bytea[], '{}'::text[], '{}'::bytea[], '{}'::bigint[]) AS s
$$;

CREATE OR REPLACE FUNCTION {schema}.complete_many(ks bytea[], toks text[], recs bytea[],
    ttls bigint[])
RETURNS TABLE (i integer, done boolean)
LANGUAGE sql
AS $$
    SELECT -s.i, s.done
    FROM {schema}.step_many('{}'::bytea[], '{}'::text[], '{}'::bytea[], '{}'::bigint[],
        '{}'::bigint[], '{}'::bigint[], '{}'::bigint[], ks, toks, recs, ttls) AS s
$$;

-- renew: extend the lease while its holder is current.
CREATE OR REPLACE FUNCTION {schema}.renew_lease(k bytea, tok text, lease_ms bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms();
BEGIN
    UPDATE {schema}.records AS x SET lease_until_ms = t + lease_ms,
        expires_ms = greatest(x.expires_ms, t + lease_ms)
        WHERE x.key = k AND x.state = 'i' AND x.token = tok AND x.expires_ms > t;
    RETURN FOUND;
END
$$;

-- Version 1 completed one key per call; step_many does it itself.
DROP FUNCTION IF EXISTS {schema}.complete_lease(bytea, text, bytea, bigint);

-- release: free the key for a retry (the sequence keeps fences rising).
CREATE OR REPLACE FUNCTION {schema}.release_lease(k bytea, tok text)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms(); w boolean;
BEGIN
    DELETE FROM {schema}.records AS x
        WHERE x.key = k AND x.state = 'i' AND x.token = tok AND x.expires_ms > t
        RETURNING x.waited INTO w;
    IF NOT FOUND THEN RETURN false; END IF;
    IF w THEN
        PERFORM pg_notify('{channel}', encode(k, 'hex'));
    END IF;
    RETURN true;
END
$$;

-- mark_unknown: the current lease's request may have run; keep the key
-- (and its fence) as unknown and wake waiters.
CREATE OR REPLACE FUNCTION {schema}.mark_unknown(k bytea, tok text, why text, ttl bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms(); w boolean;
BEGIN
    UPDATE {schema}.records AS x SET state = 'u', token = NULL, lease_until_ms = NULL,
        cause = why, since_ms = t, next_ms = 0, expires_ms = t + ttl
        WHERE x.key = k AND x.state = 'i' AND x.token = tok AND x.expires_ms > t
        RETURNING x.waited INTO w;
    IF NOT FOUND THEN RETURN false; END IF;
    IF w THEN
        PERFORM pg_notify('{channel}', encode(k, 'hex'));
    END IF;
    RETURN true;
END
$$;

-- resolve: settle the unknown record with fence `f`, as completed (rec,
-- ttl) or released (rec NULL).
CREATE OR REPLACE FUNCTION {schema}.resolve_unknown(k bytea, f bigint, rec bytea, ttl bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms();
BEGIN
    IF rec IS NULL THEN
        DELETE FROM {schema}.records AS x
            WHERE x.key = k AND x.state = 'u' AND x.fence = f AND x.expires_ms > t;
    ELSE
        UPDATE {schema}.records AS x SET state = 'c', fp = NULL, cause = NULL, since_ms = NULL,
            next_ms = NULL, record = rec, expires_ms = t + ttl
            WHERE x.key = k AND x.state = 'u' AND x.fence = f AND x.expires_ms > t;
    END IF;
    -- Nobody waits on an unknown record (begin answers it at once).
    RETURN FOUND;
END
$$;

-- purge: delete a record whatever its state; true if it was live.
CREATE OR REPLACE FUNCTION {schema}.purge_record(k bytea)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms(); live boolean; w boolean; st "char";
BEGIN
    DELETE FROM {schema}.records AS x WHERE x.key = k
        RETURNING x.expires_ms > t, x.waited, x.state INTO live, w, st;
    IF coalesce(w, false) THEN
        PERFORM pg_notify('{channel}', encode(k, 'hex'));
    END IF;
    -- Other replicas may keep a copy of a completed record: drop it.
    IF st = 'c' THEN
        PERFORM pg_notify('{replays}', encode(k, 'hex'));
    END IF;
    RETURN coalesce(live, false);
END
$$;

-- wait_for: true while the lease with fence `f` holds the key (the
-- caller waits for its settlement, which now notifies); false once it has
-- settled, lapsed or expired. Only the first waiter writes the flag.
CREATE OR REPLACE FUNCTION {schema}.wait_for(k bytea, f bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms(); w boolean;
BEGIN
    SELECT x.waited INTO w FROM {schema}.records AS x
        WHERE x.key = k AND x.state = 'i' AND x.fence = f AND x.lease_until_ms > t
            AND x.expires_ms > t;
    IF NOT FOUND THEN RETURN false; END IF;
    IF w THEN RETURN true; END IF;
    -- Locks the row: a settlement running now finishes first (and this
    -- finds it settled), or reads the flag this sets.
    UPDATE {schema}.records AS x SET waited = true
        WHERE x.key = k AND x.state = 'i' AND x.fence = f AND x.lease_until_ms > t
            AND x.expires_ms > t;
    RETURN FOUND;
END
$$;

-- admit: take one token from a caller's bucket; 0, or ms to wait.
CREATE OR REPLACE FUNCTION {schema}.admit(s bytea, rate double precision,
    burst double precision, ttl bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t bigint := {schema}.now_ms();
    b {schema}.buckets;
    left_now double precision;
    wait bigint := 0;
BEGIN
    LOOP
        SELECT * INTO b FROM {schema}.buckets AS x WHERE x.scope = s FOR UPDATE;
        IF FOUND THEN EXIT; END IF;
        INSERT INTO {schema}.buckets (scope, tokens, at_ms, expires_ms)
            VALUES (s, burst - 1, t, t + ttl) ON CONFLICT DO NOTHING;
        IF FOUND THEN RETURN 0; END IF;
    END LOOP;
    IF b.expires_ms <= t THEN
        left_now := burst;
    ELSE
        left_now := least(burst, b.tokens + greatest(0, t - b.at_ms) / 1000.0 * rate);
    END IF;
    IF left_now >= 1 THEN
        left_now := left_now - 1;
    ELSE
        wait := ceil((1 - left_now) / rate * 1000);
    END IF;
    UPDATE {schema}.buckets AS x SET tokens = left_now, at_ms = t, expires_ms = t + ttl
        WHERE x.scope = s;
    RETURN wait;
END
$$;

-- dedup_mark: "seen it" for a key not seen before; true if new.
CREATE OR REPLACE FUNCTION {schema}.dedup_mark(sc text, k bytea, ttl bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms();
BEGIN
    INSERT INTO {schema}.dedup AS x (scope, key, state, at_ms, expires_ms)
        VALUES (sc, k, 'm', t, t + ttl)
        ON CONFLICT (scope, key) DO UPDATE
            SET state = 'm', lease_id = NULL, fence = NULL, attempts = NULL,
                lease_until_ms = NULL, fp = NULL, worker = NULL, result = NULL,
                error = NULL, at_ms = t, expires_ms = t + ttl
            WHERE x.expires_ms <= t;
    RETURN FOUND;
END
$$;

-- dedup_claim: the claim rules of idempotency/dedup.rs, atomically.
-- kind: 'acquired' (fence, attempts, recovered) | 'completed' (result,
-- at_ms) | 'failed' / 'failed_new' (error, attempts, at_ms) |
-- 'in_progress' (retry_ms) | 'mismatch'.
CREATE OR REPLACE FUNCTION {schema}.dedup_claim(sc text, k bytea, lid text, lease_ms bigint,
    given bytea, max_attempts integer, wk bytea, keep_ms bigint, failed_ms bigint)
RETURNS TABLE (kind text, fence bigint, attempts integer, recovered boolean,
    result bytea, error bytea, at_ms bigint, retry_ms bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t bigint := {schema}.now_ms();
    r {schema}.dedup;
    differs boolean;
    n integer := 0;
    rec boolean := false;
    err bytea;
    f bigint;
BEGIN
    LOOP
        SELECT * INTO r FROM {schema}.dedup AS x
            WHERE x.scope = sc AND x.key = k FOR UPDATE;
        IF FOUND THEN EXIT; END IF;
        f := nextval('{schema}.fences');
        INSERT INTO {schema}.dedup (scope, key, state, lease_id, fence, attempts,
                lease_until_ms, fp, worker, expires_ms)
            VALUES (sc, k, 'l', lid, f, 1, t + lease_ms, given, wk, t + keep_ms)
            ON CONFLICT DO NOTHING;
        IF FOUND THEN
            RETURN QUERY SELECT 'acquired'::text, f, 1, false, NULL::bytea, NULL::bytea,
                NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
    END LOOP;
    IF r.expires_ms <= t THEN
        r.state := NULL; r.fp := NULL; -- expired: as if absent
    END IF;
    differs := r.fp IS NOT NULL AND given IS NOT NULL AND r.fp <> given;
    IF r.state = 'c' THEN
        IF differs THEN
            RETURN QUERY SELECT 'mismatch'::text, NULL::bigint, NULL::integer, false,
                NULL::bytea, NULL::bytea, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        RETURN QUERY SELECT 'completed'::text, NULL::bigint, NULL::integer, false,
            r.result, NULL::bytea, r.at_ms, NULL::bigint;
        RETURN;
    END IF;
    IF r.state = 'm' THEN
        RETURN QUERY SELECT 'completed'::text, NULL::bigint, NULL::integer, false,
            NULL::bytea, NULL::bytea, r.at_ms, NULL::bigint;
        RETURN;
    END IF;
    IF r.state = 'f' THEN
        RETURN QUERY SELECT 'failed'::text, NULL::bigint, r.attempts, false,
            NULL::bytea, r.error, r.at_ms, NULL::bigint;
        RETURN;
    END IF;
    IF r.state = 'l' THEN
        IF differs THEN
            RETURN QUERY SELECT 'mismatch'::text, NULL::bigint, NULL::integer, false,
                NULL::bytea, NULL::bytea, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        IF r.lease_until_ms > t THEN
            RETURN QUERY SELECT 'in_progress'::text, NULL::bigint, NULL::integer, false,
                NULL::bytea, NULL::bytea, NULL::bigint, r.lease_until_ms - t;
            RETURN;
        END IF;
        n := r.attempts; rec := true;
        err := convert_to('lease expired during attempt ' || r.attempts, 'UTF8');
    ELSIF r.state = 'p' THEN
        IF differs THEN
            RETURN QUERY SELECT 'mismatch'::text, NULL::bigint, NULL::integer, false,
                NULL::bytea, NULL::bytea, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        n := r.attempts; err := r.error;
    END IF;
    IF n >= max_attempts AND r.state IN ('l', 'p') THEN
        UPDATE {schema}.dedup AS x SET state = 'f', lease_id = NULL, lease_until_ms = NULL,
            worker = NULL, error = err, at_ms = t, expires_ms = t + failed_ms
            WHERE x.scope = sc AND x.key = k;
        RETURN QUERY SELECT 'failed_new'::text, NULL::bigint, n, false, NULL::bytea, err,
            t, NULL::bigint;
        RETURN;
    END IF;
    f := nextval('{schema}.fences');
    UPDATE {schema}.dedup AS x SET state = 'l', lease_id = lid, fence = f, attempts = n + 1,
        lease_until_ms = t + lease_ms,
        fp = CASE WHEN r.state IS NULL THEN given ELSE coalesce(r.fp, given) END,
        worker = wk, result = NULL, error = NULL, at_ms = NULL, expires_ms = t + keep_ms
        WHERE x.scope = sc AND x.key = k;
    RETURN QUERY SELECT 'acquired'::text, f, n + 1, rec, NULL::bytea, NULL::bytea,
        NULL::bigint, NULL::bigint;
END
$$;

-- dedup_extend: move the current lease's end to now + lease_ms.
CREATE OR REPLACE FUNCTION {schema}.dedup_extend(sc text, k bytea, lid text, lease_ms bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms();
BEGIN
    UPDATE {schema}.dedup AS x SET lease_until_ms = t + lease_ms,
        expires_ms = greatest(x.expires_ms, t + lease_ms)
        WHERE x.scope = sc AND x.key = k AND x.state = 'l' AND x.lease_id = lid
            AND x.expires_ms > t;
    RETURN FOUND;
END
$$;

-- dedup_complete: record the outcome for the current lease; true again
-- for the lease that completed it.
CREATE OR REPLACE FUNCTION {schema}.dedup_complete(sc text, k bytea, lid text, res bytea,
    keep_ms bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms(); r {schema}.dedup;
BEGIN
    SELECT * INTO r FROM {schema}.dedup AS x
        WHERE x.scope = sc AND x.key = k AND x.expires_ms > t FOR UPDATE;
    IF NOT FOUND OR r.lease_id IS DISTINCT FROM lid THEN RETURN false; END IF;
    IF r.state = 'c' THEN RETURN true; END IF;
    IF r.state <> 'l' THEN RETURN false; END IF;
    UPDATE {schema}.dedup AS x SET state = 'c', lease_until_ms = NULL, worker = NULL,
        error = NULL, result = res, at_ms = t, expires_ms = t + keep_ms
        WHERE x.scope = sc AND x.key = k;
    RETURN true;
END
$$;

-- dedup_release: give the message back for a retry (pending), or fail it.
-- 0 the lease was lost, 1 pending again, 2 failed (at_ms is now).
CREATE OR REPLACE FUNCTION {schema}.dedup_release(sc text, k bytea, lid text,
    permanent boolean, err bytea, keep_ms bigint, failed_ms bigint)
RETURNS integer LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE t bigint := {schema}.now_ms();
BEGIN
    UPDATE {schema}.dedup AS x SET
        state = CASE WHEN permanent THEN 'f'::"char" ELSE 'p'::"char" END,
        lease_id = NULL, lease_until_ms = NULL, worker = NULL, error = err,
        at_ms = CASE WHEN permanent THEN t ELSE NULL END,
        expires_ms = t + CASE WHEN permanent THEN failed_ms ELSE keep_ms END
        WHERE x.scope = sc AND x.key = k AND x.state = 'l' AND x.lease_id = lid
            AND x.expires_ms > t;
    IF NOT FOUND THEN RETURN 0; END IF;
    RETURN CASE WHEN permanent THEN 2 ELSE 1 END;
END
$$;
